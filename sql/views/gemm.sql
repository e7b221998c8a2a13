-- name: gemm
-- inputs: X(n,k,v), W(o,k,w), B(o,b)
-- params:
-- output: (n,k,v)
-- Fully connected: y[n, o] = sum_k x[n, k] * W[o, k] + b[o]; a join on k, a sum per (n, o).
WITH acc AS (
    SELECT X.n, W.o, sum(CAST(X.v AS DOUBLE) * CAST(W.w AS DOUBLE)) AS s
    FROM {X} AS X
    JOIN {W} AS W ON X.k = W.k
    GROUP BY X.n, W.o
)
SELECT acc.n, acc.o AS k, CAST(acc.s + B.b AS FLOAT) AS v
FROM acc
JOIN {B} AS B ON acc.o = B.o
