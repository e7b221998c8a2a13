-- name: pad
-- inputs: X(n,c,y,x,v)
-- params: pad_t, pad_l, C, H_out, W_out, value
-- output: (n,c,y,x,v)
-- Constant padding: the full output grid, input cells shifted by (pad_t, pad_l), the rest value.
SELECT nn.n, CAST(ch.c AS INTEGER) AS c, CAST(gy.y AS INTEGER) AS y, CAST(gx.x AS INTEGER) AS x,
       CAST(coalesce(CAST(X.v AS DOUBLE), {value}) AS FLOAT) AS v
FROM (SELECT DISTINCT n FROM {X}) AS nn
CROSS JOIN range({C}) AS ch(c)
CROSS JOIN range({H_out}) AS gy(y)
CROSS JOIN range({W_out}) AS gx(x)
LEFT JOIN {X} AS X
  ON X.n = nn.n AND X.c = ch.c AND X.y = gy.y - {pad_t} AND X.x = gx.x - {pad_l}
