-- name: input
-- inputs: P(n,y,x), C(c,v)
-- params: patch_h, patch_w
-- output: (n,c,y,x,v)
-- The occluded image's delta: query n puts the patch (colour C, in model-input units per
-- channel) at rows [y, y + patch_h) and columns [x, x + patch_w) of every channel.
SELECT P.n, C.c, CAST(P.y + dy.i AS INTEGER) AS y, CAST(P.x + dx.j AS INTEGER) AS x, C.v
FROM {P} AS P
CROSS JOIN range({patch_h}) AS dy(i)
CROSS JOIN range({patch_w}) AS dx(j)
CROSS JOIN {C} AS C
