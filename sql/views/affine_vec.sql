-- name: affine_vec
-- inputs: X(n,k,v), S(c,scale,shift)
-- params: join_k
-- output: (n,k,v)
-- Per-feature scale and shift of a vector (batch-norm after a dense layer): feature k takes
-- row c = k of S (join_k = 1), or the single row c = 0 for a scalar scale (join_k = 0).
SELECT X.n, X.k, CAST(CAST(X.v AS DOUBLE) * S.scale + S.shift AS FLOAT) AS v
FROM {X} AS X
JOIN {S} AS S ON X.k * {join_k} = S.c
