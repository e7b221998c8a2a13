-- name: identity
-- inputs: X(*,v)
-- params:
-- output: (*,v)
-- The input relation unchanged (the graph input, single-operand merges, vector reshapes).
SELECT * FROM {X}
