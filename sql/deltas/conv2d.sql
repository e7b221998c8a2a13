-- name: conv2d
-- inputs: D(n,c,y,x,v), X(n,c,y,x,v), Y(n,c,y,x,v), W(o,c,ky,kx,w)
-- params: stride_h, stride_w, pad_t, pad_l, dil_h, dil_w, c_in_group, c_out_group, H_out, W_out
-- output: (n,c,y,x,v)
-- Linear delta rule: conv(X + dX) = conv(X) + conv(dX). dX is query n's change of the input
-- on the cells of its delta relation D (new value minus the materialized input view X); an
-- output cell that a changed input cell reaches through some tap gets the materialized output
-- view Y plus the convolved change. Those cells are the layer's changed region (the bias and
-- the padding are already in Y). Tap inversion as in views/conv2d.sql.
WITH dx AS (
    SELECT D.n, D.c, D.y, D.x, CAST(D.v AS DOUBLE) - CAST(X.v AS DOUBLE) AS dv
    FROM {D} AS D
    JOIN {X} AS X ON X.c = D.c AND X.y = D.y AND X.x = D.x
),
taps AS (
    SELECT dx.n, W.o,
           dx.y + {pad_t} - W.ky * {dil_h} AS ty,
           dx.x + {pad_l} - W.kx * {dil_w} AS tx,
           dx.dv * CAST(W.w AS DOUBLE) AS p
    FROM dx
    JOIN {W} AS W ON dx.c = (W.o // {c_out_group}) * {c_in_group} + W.c
),
acc AS (
    SELECT n, o, ty // {stride_h} AS y, tx // {stride_w} AS x, sum(p) AS s
    FROM taps
    WHERE ty >= 0 AND tx >= 0 AND ty % {stride_h} = 0 AND tx % {stride_w} = 0
      AND ty < {H_out} * {stride_h} AND tx < {W_out} * {stride_w}
    GROUP BY ALL
)
SELECT acc.n, acc.o AS c, CAST(acc.y AS INTEGER) AS y, CAST(acc.x AS INTEGER) AS x,
       CAST(CAST(Y.v AS DOUBLE) + acc.s AS FLOAT) AS v
FROM acc
JOIN {Y} AS Y ON Y.c = acc.o AND Y.y = acc.y AND Y.x = acc.x
