-- name: changed_positions
-- inputs: A(n,c,y,x,v), B(n,c,y,x,v)
-- output: (n,y,x)
-- The merge rule's changed region: per query, every position where either operand changed.
SELECT DISTINCT n, y, x FROM {A}
UNION
SELECT DISTINCT n, y, x FROM {B}
