-- name: transpose
-- inputs: X(n,c,y,x,v)
-- params: p0, p1, p2
-- output: (n,c,y,x,v)
-- Per-sample axis permutation: output axis i takes input axis p_i (0 = c, 1 = y, 2 = x).
SELECT n,
       CAST(CASE {p0} WHEN 0 THEN c WHEN 1 THEN y ELSE x END AS INTEGER) AS c,
       CAST(CASE {p1} WHEN 0 THEN c WHEN 1 THEN y ELSE x END AS INTEGER) AS y,
       CAST(CASE {p2} WHEN 0 THEN c WHEN 1 THEN y ELSE x END AS INTEGER) AS x,
       v
FROM {X}
