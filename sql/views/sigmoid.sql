-- name: sigmoid
-- inputs: X(*,v)
-- params:
-- output: (*,v)
SELECT * REPLACE (CAST(1.0 / (1.0 + exp(-CAST(v AS DOUBLE))) AS FLOAT) AS v)
FROM {X}
