-- name: softmax
-- inputs: X(n,k,v)
-- params:
-- output: (n,k,v)
-- Softmax over k within each sample n (window partitioned by n), max-shifted for stability.
WITH z AS (
    SELECT n, k, CAST(v AS DOUBLE) - max(CAST(v AS DOUBLE)) OVER (PARTITION BY n) AS z
    FROM {X}
)
SELECT n, k, CAST(exp(z) / sum(exp(z)) OVER (PARTITION BY n) AS FLOAT) AS v
FROM z
