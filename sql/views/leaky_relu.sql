-- name: leaky_relu
-- inputs: X(*,v)
-- params: alpha
-- output: (*,v)
SELECT * REPLACE (CAST(CASE WHEN v >= 0 THEN v ELSE CAST(v AS DOUBLE) * {alpha} END AS FLOAT) AS v)
FROM {X}
