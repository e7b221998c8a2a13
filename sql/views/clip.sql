-- name: clip
-- inputs: X(*,v)
-- params: lo, hi
-- output: (*,v)
SELECT * REPLACE (CAST(least(greatest(CAST(v AS DOUBLE), {lo}), {hi}) AS FLOAT) AS v)
FROM {X}
