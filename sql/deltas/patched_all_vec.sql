-- name: patched_all_vec
-- inputs: Q(n), D(n,k,v), X(n,k,v)
-- output: (n,k,v)
-- patched_all.sql for vector relations.
SELECT Q.n, X.k, coalesce(D.v, X.v) AS v
FROM {Q} AS Q
CROSS JOIN {X} AS X
LEFT JOIN {D} AS D ON D.n = Q.n AND D.k = X.k
