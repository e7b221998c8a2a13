-- name: hard_sigmoid
-- inputs: X(*,v)
-- params: alpha, beta
-- output: (*,v)
SELECT * REPLACE (
    CAST(least(greatest({alpha} * CAST(v AS DOUBLE) + {beta}, 0.0), 1.0) AS FLOAT) AS v)
FROM {X}
