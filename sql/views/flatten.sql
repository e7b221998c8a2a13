-- name: flatten
-- inputs: X(n,c,y,x,v)
-- params: H, W
-- output: (n,k,v)
-- C-order flatten of a (C, H, W) map: k = (c*H + y)*W + x.
SELECT n, CAST((c * {H} + y) * {W} + x AS INTEGER) AS k, v
FROM {X}
