-- name: reshape
-- inputs: X(n,c,y,x,v)
-- params: H_in, W_in, H_out, W_out
-- output: (n,c,y,x,v)
-- C-order reshape (C, H_in, W_in) -> (C', H_out, W_out) through the flat index f.
WITH f AS (
    SELECT n, (c * {H_in} + y) * {W_in} + x AS f, v
    FROM {X}
)
SELECT n, CAST(f // ({H_out} * {W_out}) AS INTEGER) AS c, CAST((f // {W_out}) % {H_out} AS INTEGER) AS y,
       CAST(f % {W_out} AS INTEGER) AS x, v
FROM f
