-- name: global_avgpool
-- inputs: X(n,c,y,x,v)
-- params:
-- output: (n,c,y,x,v)
-- Mean over all cells of each (n, c); the result is the (C, 1, 1) map at y = x = 0.
SELECT n, c, CAST(0 AS INTEGER) AS y, CAST(0 AS INTEGER) AS x, CAST(avg(CAST(v AS DOUBLE)) AS FLOAT) AS v
FROM {X}
GROUP BY n, c
