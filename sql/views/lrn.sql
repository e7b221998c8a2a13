-- name: lrn
-- inputs: X(n,c,y,x,v)
-- params: size, alpha, beta, bias, lo, hi
-- output: (n,c,y,x,v)
-- ONNX LRN: v / (bias + alpha/size * sum of squares over channels [c - lo, c + hi])^beta,
-- a band self-join on the channel key (channels outside [0, C) simply do not exist).
SELECT a.n, a.c, a.y, a.x,
       CAST(CAST(a.v AS DOUBLE)
            / pow({bias} + {alpha} / {size} * sum(CAST(b.v AS DOUBLE) * CAST(b.v AS DOUBLE)), {beta})
            AS FLOAT) AS v
FROM {X} AS a
JOIN {X} AS b
  ON a.n = b.n AND a.y = b.y AND a.x = b.x AND b.c BETWEEN a.c - {lo} AND a.c + {hi}
GROUP BY a.n, a.c, a.y, a.x, a.v
