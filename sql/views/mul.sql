-- name: mul
-- inputs: A(n,c,y,x,v), B(n,c,y,x,v)
-- params: join_c, join_y, join_x
-- output: (n,c,y,x,v)
-- Elementwise A * B with numpy broadcasting over (C, H, W): join_<axis> is 1 where both
-- operands span the axis (equal keys join) and 0 where one has extent 1 (its key is always 0,
-- the condition becomes 0 = 0 and the other side's key is the output key: greatest()).
SELECT A.n, greatest(A.c, B.c) AS c, greatest(A.y, B.y) AS y, greatest(A.x, B.x) AS x,
       CAST(CAST(A.v AS DOUBLE) * CAST(B.v AS DOUBLE) AS FLOAT) AS v
FROM {A} AS A
JOIN {B} AS B
  ON A.n = B.n AND A.c * {join_c} = B.c * {join_c} AND A.y * {join_y} = B.y * {join_y}
 AND A.x * {join_x} = B.x * {join_x}
