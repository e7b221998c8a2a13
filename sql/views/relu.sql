-- name: relu
-- inputs: X(*,v)
-- params:
-- output: (*,v)
-- Pointwise: keys pass through unchanged (any relation schema with a value column v).
SELECT * REPLACE (CAST(CASE WHEN v > 0 THEN v ELSE 0.0 END AS FLOAT) AS v)
FROM {X}
