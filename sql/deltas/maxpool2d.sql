-- name: maxpool2d
-- inputs: D(n,c,y,x,v), X(n,c,y,x,v)
-- params: kernel_h, kernel_w, stride_h, stride_w, pad_t, pad_l, H_out, W_out
-- output: (n,c,y,x,v)
-- Max is not linear: every output cell whose window holds a changed input cell (the changed
-- region) is recomputed over its whole window, each window cell read from the query's delta
-- D where it changed and from the materialized input view X elsewhere. Padding cells are
-- absent from X and never win.
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
win AS (
    SELECT cells.n, cells.c, cells.y, cells.x, coalesce(D.v, X.v) AS v
    FROM cells
    CROSS JOIN range({kernel_h}) AS ky(i)
    CROSS JOIN range({kernel_w}) AS kx(j)
    JOIN {X} AS X
      ON X.c = cells.c AND X.y = cells.y * {stride_h} - {pad_t} + ky.i
     AND X.x = cells.x * {stride_w} - {pad_l} + kx.j
    LEFT JOIN {D} AS D ON D.n = cells.n AND D.c = X.c AND D.y = X.y AND D.x = X.x
)
SELECT n, c, CAST(y AS INTEGER) AS y, CAST(x AS INTEGER) AS x, max(v) AS v
FROM win
GROUP BY n, c, y, x
