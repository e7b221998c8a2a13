-- name: avgpool2d
-- inputs: D(n,c,y,x,v), X(n,c,y,x,v)
-- params: kernel_h, kernel_w, stride_h, stride_w, pad_t, pad_l, pad_b, pad_r, H_in, W_in, H_out, W_out, include_pad
-- output: (n,c,y,x,v)
-- The changed region as in maxpool2d.sql (every output cell whose window holds a changed
-- input cell), each recomputed over its window with the query's delta D applied to the
-- materialized input view X; the divisor counts the window's cells as views/avgpool2d.sql.
WITH cells AS (
    SELECT DISTINCT D.n, D.c, (D.y + {pad_t} - ky.i) // {stride_h} AS y,
                    (D.x + {pad_l} - kx.j) // {stride_w} AS x
    FROM {D} AS D
    CROSS JOIN range({kernel_h}) AS ky(i)
    CROSS JOIN range({kernel_w}) AS kx(j)
    WHERE D.y + {pad_t} - ky.i >= 0 AND D.x + {pad_l} - kx.j >= 0
      AND (D.y + {pad_t} - ky.i) % {stride_h} = 0 AND (D.x + {pad_l} - kx.j) % {stride_w} = 0
      AND D.y + {pad_t} - ky.i < {H_out} * {stride_h} AND D.x + {pad_l} - kx.j < {W_out} * {stride_w}
),
acc AS (
    SELECT cells.n, cells.c, cells.y, cells.x, sum(CAST(coalesce(D.v, X.v) AS DOUBLE)) AS s
    FROM cells
    CROSS JOIN range({kernel_h}) AS ky(i)
    CROSS JOIN range({kernel_w}) AS kx(j)
    JOIN {X} AS X
      ON X.c = cells.c AND X.y = cells.y * {stride_h} - {pad_t} + ky.i
     AND X.x = cells.x * {stride_w} - {pad_l} + kx.j
    LEFT JOIN {D} AS D ON D.n = cells.n AND D.c = X.c AND D.y = X.y AND D.x = X.x
    GROUP BY cells.n, cells.c, cells.y, cells.x
)
SELECT n, c, CAST(y AS INTEGER) AS y, CAST(x AS INTEGER) AS x,
       CAST(s / (
           (least(y * {stride_h} - {pad_t} + {kernel_h}, {H_in} + {pad_b} * {include_pad})
            - greatest(y * {stride_h} - {pad_t}, -{pad_t} * {include_pad}))
         * (least(x * {stride_w} - {pad_l} + {kernel_w}, {W_in} + {pad_r} * {include_pad})
            - greatest(x * {stride_w} - {pad_l}, -{pad_l} * {include_pad}))
       ) AS FLOAT) AS v
FROM acc
