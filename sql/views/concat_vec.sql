-- name: concat_vec
-- inputs: A(n,k,v), B(n,k,v)
-- params: k_offset
-- output: (n,k,v)
-- Concat of two vectors (k_offset = features of A); N inputs are a left-deep chain.
SELECT n, k, v FROM {A}
UNION ALL
SELECT n, k + {k_offset} AS k, v FROM {B}
