-- name: maxpool2d
-- inputs: X(n,c,y,x,v)
-- params: kernel_h, kernel_w, stride_h, stride_w, pad_t, pad_l, H_out, W_out
-- output: (n,c,y,x,v)
-- Padding is -inf: cells outside the input are simply absent, so they never win the max.
-- Window (yo, xo) covers input rows yo*stride_h - pad_t + i, i < kernel_h; inverted per input
-- cell and kernel offset as for conv2d. Ceil mode only changes H_out/W_out (windows that run
-- past the input read nothing there).
WITH taps AS (
    SELECT X.n, X.c, X.y + {pad_t} - ky.i AS ty, X.x + {pad_l} - kx.j AS tx, X.v
    FROM {X} AS X
    CROSS JOIN range({kernel_h}) AS ky(i)
    CROSS JOIN range({kernel_w}) AS kx(j)
)
SELECT n, c, CAST(ty // {stride_h} AS INTEGER) AS y, CAST(tx // {stride_w} AS INTEGER) AS x,
       max(v) AS v
FROM taps
WHERE ty >= 0 AND tx >= 0 AND ty % {stride_h} = 0 AND tx % {stride_w} = 0
  AND ty < {H_out} * {stride_h} AND tx < {W_out} * {stride_w}
GROUP BY ALL
