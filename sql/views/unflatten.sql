-- name: unflatten
-- inputs: X(n,k,v)
-- params: H, W
-- output: (n,c,y,x,v)
-- C-order reshape of a vector into a (C, H, W) map: c = k // (H*W), y = (k // W) % H, x = k % W.
SELECT n, CAST(k // ({H} * {W}) AS INTEGER) AS c, CAST((k // {W}) % {H} AS INTEGER) AS y,
       CAST(k % {W} AS INTEGER) AS x, v
FROM {X}
