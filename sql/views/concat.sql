-- name: concat
-- inputs: A(n,c,y,x,v), B(n,c,y,x,v)
-- params: c_offset
-- output: (n,c,y,x,v)
-- Channel concat of two maps (c_offset = channels of A); N inputs are a left-deep chain.
SELECT n, c, y, x, v FROM {A}
UNION ALL
SELECT n, c + {c_offset} AS c, y, x, v FROM {B}
