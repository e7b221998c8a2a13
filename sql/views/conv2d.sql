-- name: conv2d
-- inputs: X(n,c,y,x,v), W(o,c,ky,kx,w), B(o,b)
-- params: stride_h, stride_w, pad_t, pad_l, dil_h, dil_w, c_in_group, c_out_group, H_out, W_out
-- output: (n,c,y,x,v)
-- Output cell (yo, xo) of channel o reads input row yo*stride_h - pad_t + ky*dil_h (and the
-- same for columns) of channel group(o)*c_in_group + W.c, group(o) = o // c_out_group.
-- Inverted per input row: ty = y + pad_t - ky*dil_h must be a non-negative multiple of
-- stride_h below H_out*stride_h. Zero padding needs no rows: taps outside the input find no
-- X row and add nothing. The grid LEFT JOIN keeps cells whose window lies in padding only.
WITH taps AS (
    SELECT X.n, W.o,
           X.y + {pad_t} - W.ky * {dil_h} AS ty,
           X.x + {pad_l} - W.kx * {dil_w} AS tx,
           CAST(X.v AS DOUBLE) * CAST(W.w AS DOUBLE) AS p
    FROM {X} AS X
    JOIN {W} AS W ON X.c = (W.o // {c_out_group}) * {c_in_group} + W.c
),
acc AS (
    SELECT n, o, ty // {stride_h} AS y, tx // {stride_w} AS x, sum(p) AS s
    FROM taps
    WHERE ty >= 0 AND tx >= 0 AND ty % {stride_h} = 0 AND tx % {stride_w} = 0
      AND ty < {H_out} * {stride_h} AND tx < {W_out} * {stride_w}
    GROUP BY ALL
),
grid AS (
    SELECT nn.n, B.o, B.b, CAST(gy.y AS INTEGER) AS y, CAST(gx.x AS INTEGER) AS x
    FROM (SELECT DISTINCT n FROM {X}) AS nn
    CROSS JOIN {B} AS B
    CROSS JOIN range({H_out}) AS gy(y)
    CROSS JOIN range({W_out}) AS gx(x)
)
SELECT g.n, g.o AS c, g.y, g.x, CAST(coalesce(a.s, 0.0) + g.b AS FLOAT) AS v
FROM grid AS g
LEFT JOIN acc AS a ON a.n = g.n AND a.o = g.o AND a.y = g.y AND a.x = g.x
