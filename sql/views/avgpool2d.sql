-- name: avgpool2d
-- inputs: X(n,c,y,x,v)
-- params: kernel_h, kernel_w, stride_h, stride_w, pad_t, pad_l, pad_b, pad_r, H_in, W_in, H_out, W_out, include_pad
-- output: (n,c,y,x,v)
-- Sum over the window as in maxpool2d (zero padding: absent cells add nothing), divided by
-- the number of counted cells: the window [yo*stride_h - pad_t, +kernel_h) clipped to the
-- input rows [0, H_in), or with include_pad = 1 to the declared padding [-pad_t, H_in + pad_b)
-- but never beyond it (cells past it exist only because of ceil mode). Same for columns.
WITH taps AS (
    SELECT X.n, X.c, X.y + {pad_t} - ky.i AS ty, X.x + {pad_l} - kx.j AS tx, X.v
    FROM {X} AS X
    CROSS JOIN range({kernel_h}) AS ky(i)
    CROSS JOIN range({kernel_w}) AS kx(j)
),
acc AS (
    SELECT n, c, ty // {stride_h} AS y, tx // {stride_w} AS x, sum(CAST(v AS DOUBLE)) AS s
    FROM taps
    WHERE ty >= 0 AND tx >= 0 AND ty % {stride_h} = 0 AND tx % {stride_w} = 0
      AND ty < {H_out} * {stride_h} AND tx < {W_out} * {stride_w}
    GROUP BY ALL
)
SELECT n, c, CAST(y AS INTEGER) AS y, CAST(x AS INTEGER) AS x,
       CAST(s / (
           (least(y * {stride_h} - {pad_t} + {kernel_h}, {H_in} + {pad_b} * {include_pad})
            - greatest(y * {stride_h} - {pad_t}, -{pad_t} * {include_pad}))
         * (least(x * {stride_w} - {pad_l} + {kernel_w}, {W_in} + {pad_r} * {include_pad})
            - greatest(x * {stride_w} - {pad_l}, -{pad_l} * {include_pad}))
       ) AS FLOAT) AS v
FROM acc
