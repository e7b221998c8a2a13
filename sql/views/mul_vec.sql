-- name: mul_vec
-- inputs: A(n,k,v), B(n,k,v)
-- params: join_k
-- output: (n,k,v)
-- Elementwise A * B of vectors with broadcasting: join_k is 1 where both operands span the
-- features (equal keys join) and 0 where one has a single feature (its key is always 0).
SELECT A.n, greatest(A.k, B.k) AS k, CAST(CAST(A.v AS DOUBLE) * CAST(B.v AS DOUBLE) AS FLOAT) AS v
FROM {A} AS A
JOIN {B} AS B ON A.n = B.n AND A.k * {join_k} = B.k * {join_k}
