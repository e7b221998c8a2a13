-- name: affine
-- inputs: X(n,c,y,x,v), S(c,scale,shift)
-- params:
-- output: (n,c,y,x,v)
-- Per-channel scale and shift (unfolded batch-norm, Keras Mul/Add by constants).
SELECT X.n, X.c, X.y, X.x, CAST(CAST(X.v AS DOUBLE) * S.scale + S.shift AS FLOAT) AS v
FROM {X} AS X
JOIN {S} AS S ON X.c = S.c
