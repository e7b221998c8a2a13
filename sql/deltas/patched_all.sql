-- name: patched_all
-- inputs: Q(n), D(n,c,y,x,v), X(n,c,y,x,v)
-- output: (n,c,y,x,v)
-- The global rule's input: per query n of Q, the whole materialized view X with the query's
-- delta D stitched in. The layer then runs in full on it.
SELECT Q.n, X.c, X.y, X.x, coalesce(D.v, X.v) AS v
FROM {Q} AS Q
CROSS JOIN {X} AS X
LEFT JOIN {D} AS D ON D.n = Q.n AND D.c = X.c AND D.y = X.y AND D.x = X.x
