-- name: hard_swish
-- inputs: X(*,v)
-- params:
-- output: (*,v)
SELECT * REPLACE (
    CAST(CAST(v AS DOUBLE) * least(greatest(CAST(v AS DOUBLE) / 6.0 + 0.5, 0.0), 1.0) AS FLOAT) AS v)
FROM {X}
