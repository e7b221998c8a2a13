-- name: patched
-- inputs: P(n,y,x), D(n,c,y,x,v), X(n,c,y,x,v)
-- output: (n,c,y,x,v)
-- One operand of a merge on its changed positions P, all channels: the query's delta D where
-- the operand changed, its materialized view X elsewhere (delta relations always hold every
-- channel of a changed position, so LRN and concat see whole channel columns).
SELECT P.n, X.c, X.y, X.x, coalesce(D.v, X.v) AS v
FROM {P} AS P
JOIN {X} AS X ON X.y = P.y AND X.x = P.x
LEFT JOIN {D} AS D ON D.n = P.n AND D.c = X.c AND D.y = X.y AND D.x = X.x
