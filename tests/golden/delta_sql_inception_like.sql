-- delta queries of inception: patch 5x4, 35 delta relations over 24 materialized views
-- inputs per batch: q_positions(n, y, x), q_queries(n), q_patch(c, v); answer: d_l021_softmax_58(n, k, v)

-- input [input rule, deltas/input, changed cells]
CREATE OR REPLACE TEMP TABLE "d_l000_input" AS
SELECT P.n, C.c, CAST(P.y + dy.i AS INTEGER) AS y, CAST(P.x + dx.j AS INTEGER) AS x, C.v
FROM "q_positions" AS P
CROSS JOIN range(5) AS dy(i)
CROSS JOIN range(4) AS dx(j)
CROSS JOIN "q_patch" AS C;

-- Conv.4 [window rule, deltas/conv2d, changed cells]
CREATE OR REPLACE TEMP TABLE "d_l001_conv_4" AS
WITH dx AS (
    SELECT D.n, D.c, D.y, D.x, CAST(D.v AS DOUBLE) - CAST(X.v AS DOUBLE) AS dv
    FROM "d_l000_input" AS D
    JOIN "l000_input" AS X ON X.c = D.c AND X.y = D.y AND X.x = D.x
),
taps AS (
    SELECT dx.n, W.o,
           dx.y + 0 - W.ky * 1 AS ty,
           dx.x + 0 - W.kx * 1 AS tx,
           dx.dv * CAST(W.w AS DOUBLE) AS p
    FROM dx
    JOIN "l001_conv_4__w" AS W ON dx.c = (W.o // 6) * 3 + W.c
),
acc AS (
    SELECT n, o, ty // 2 AS y, tx // 2 AS x, sum(p) AS s
    FROM taps
    WHERE ty >= 0 AND tx >= 0 AND ty % 2 = 0 AND tx % 2 = 0
      AND ty < 8 * 2 AND tx < 9 * 2
    GROUP BY ALL
)
SELECT acc.n, acc.o AS c, CAST(acc.y AS INTEGER) AS y, CAST(acc.x AS INTEGER) AS x,
       CAST(CAST(Y.v AS DOUBLE) + acc.s AS FLOAT) AS v
FROM acc
JOIN "l001_conv_4" AS Y ON Y.c = acc.o AND Y.y = acc.y AND Y.x = acc.x;

-- Relu.6 [pointwise rule, views/relu, changed cells]
CREATE OR REPLACE TEMP TABLE "d_l002_relu_6" AS
SELECT * REPLACE (CAST(CASE WHEN v > 0 THEN v ELSE 0.0 END AS FLOAT) AS v)
FROM (SELECT * REPLACE (CAST(v AS DOUBLE) AS v) FROM "d_l001_conv_4");

-- Conv.10 [window rule, deltas/conv2d, changed cells]
CREATE OR REPLACE TEMP TABLE "d_l003_conv_10" AS
WITH dx AS (
    SELECT D.n, D.c, D.y, D.x, CAST(D.v AS DOUBLE) - CAST(X.v AS DOUBLE) AS dv
    FROM "d_l002_relu_6" AS D
    JOIN "l002_relu_6" AS X ON X.c = D.c AND X.y = D.y AND X.x = D.x
),
taps AS (
    SELECT dx.n, W.o,
           dx.y + 0 - W.ky * 1 AS ty,
           dx.x + 0 - W.kx * 1 AS tx,
           dx.dv * CAST(W.w AS DOUBLE) AS p
    FROM dx
    JOIN "l003_conv_10__w" AS W ON dx.c = (W.o // 4) * 6 + W.c
),
acc AS (
    SELECT n, o, ty // 1 AS y, tx // 1 AS x, sum(p) AS s
    FROM taps
    WHERE ty >= 0 AND tx >= 0 AND ty % 1 = 0 AND tx % 1 = 0
      AND ty < 8 * 1 AND tx < 9 * 1
    GROUP BY ALL
)
SELECT acc.n, acc.o AS c, CAST(acc.y AS INTEGER) AS y, CAST(acc.x AS INTEGER) AS x,
       CAST(CAST(Y.v AS DOUBLE) + acc.s AS FLOAT) AS v
FROM acc
JOIN "l003_conv_10" AS Y ON Y.c = acc.o AND Y.y = acc.y AND Y.x = acc.x;

-- Relu.12 [pointwise rule, views/relu, changed cells]
CREATE OR REPLACE TEMP TABLE "d_l004_relu_12" AS
SELECT * REPLACE (CAST(CASE WHEN v > 0 THEN v ELSE 0.0 END AS FLOAT) AS v)
FROM (SELECT * REPLACE (CAST(v AS DOUBLE) AS v) FROM "d_l003_conv_10");

-- Conv.16 [window rule, deltas/conv2d, changed cells]
CREATE OR REPLACE TEMP TABLE "d_l005_conv_16" AS
WITH dx AS (
    SELECT D.n, D.c, D.y, D.x, CAST(D.v AS DOUBLE) - CAST(X.v AS DOUBLE) AS dv
    FROM "d_l002_relu_6" AS D
    JOIN "l002_relu_6" AS X ON X.c = D.c AND X.y = D.y AND X.x = D.x
),
taps AS (
    SELECT dx.n, W.o,
           dx.y + 0 - W.ky * 1 AS ty,
           dx.x + 3 - W.kx * 1 AS tx,
           dx.dv * CAST(W.w AS DOUBLE) AS p
    FROM dx
    JOIN "l005_conv_16__w" AS W ON dx.c = (W.o // 4) * 6 + W.c
),
acc AS (
    SELECT n, o, ty // 1 AS y, tx // 1 AS x, sum(p) AS s
    FROM taps
    WHERE ty >= 0 AND tx >= 0 AND ty % 1 = 0 AND tx % 1 = 0
      AND ty < 8 * 1 AND tx < 9 * 1
    GROUP BY ALL
)
SELECT acc.n, acc.o AS c, CAST(acc.y AS INTEGER) AS y, CAST(acc.x AS INTEGER) AS x,
       CAST(CAST(Y.v AS DOUBLE) + acc.s AS FLOAT) AS v
FROM acc
JOIN "l005_conv_16" AS Y ON Y.c = acc.o AND Y.y = acc.y AND Y.x = acc.x;

-- Conv.20 [window rule, deltas/conv2d, changed cells]
CREATE OR REPLACE TEMP TABLE "d_l006_conv_20" AS
WITH dx AS (
    SELECT D.n, D.c, D.y, D.x, CAST(D.v AS DOUBLE) - CAST(X.v AS DOUBLE) AS dv
    FROM "d_l005_conv_16" AS D
    JOIN "l005_conv_16" AS X ON X.c = D.c AND X.y = D.y AND X.x = D.x
),
taps AS (
    SELECT dx.n, W.o,
           dx.y + 3 - W.ky * 1 AS ty,
           dx.x + 0 - W.kx * 1 AS tx,
           dx.dv * CAST(W.w AS DOUBLE) AS p
    FROM dx
    JOIN "l006_conv_20__w" AS W ON dx.c = (W.o // 4) * 4 + W.c
),
acc AS (
    SELECT n, o, ty // 1 AS y, tx // 1 AS x, sum(p) AS s
    FROM taps
    WHERE ty >= 0 AND tx >= 0 AND ty % 1 = 0 AND tx % 1 = 0
      AND ty < 8 * 1 AND tx < 9 * 1
    GROUP BY ALL
)
SELECT acc.n, acc.o AS c, CAST(acc.y AS INTEGER) AS y, CAST(acc.x AS INTEGER) AS x,
       CAST(CAST(Y.v AS DOUBLE) + acc.s AS FLOAT) AS v
FROM acc
JOIN "l006_conv_20" AS Y ON Y.c = acc.o AND Y.y = acc.y AND Y.x = acc.x;

-- Relu.22 [pointwise rule, views/relu, changed cells]
CREATE OR REPLACE TEMP TABLE "d_l007_relu_22" AS
SELECT * REPLACE (CAST(CASE WHEN v > 0 THEN v ELSE 0.0 END AS FLOAT) AS v)
FROM (SELECT * REPLACE (CAST(v AS DOUBLE) AS v) FROM "d_l006_conv_20");

-- AveragePool.24 [window rule, deltas/avgpool2d, changed cells]
CREATE OR REPLACE TEMP TABLE "d_l008_averagepool_24" AS
WITH cells AS (
    SELECT DISTINCT D.n, D.c, (D.y + 1 - ky.i) // 1 AS y,
                    (D.x + 1 - kx.j) // 1 AS x
    FROM "d_l002_relu_6" AS D
    CROSS JOIN range(3) AS ky(i)
    CROSS JOIN range(3) AS kx(j)
    WHERE D.y + 1 - ky.i >= 0 AND D.x + 1 - kx.j >= 0
      AND (D.y + 1 - ky.i) % 1 = 0 AND (D.x + 1 - kx.j) % 1 = 0
      AND D.y + 1 - ky.i < 8 * 1 AND D.x + 1 - kx.j < 9 * 1
),
acc AS (
    SELECT cells.n, cells.c, cells.y, cells.x, sum(CAST(coalesce(D.v, X.v) AS DOUBLE)) AS s
    FROM cells
    CROSS JOIN range(3) AS ky(i)
    CROSS JOIN range(3) AS kx(j)
    JOIN "l002_relu_6" AS X
      ON X.c = cells.c AND X.y = cells.y * 1 - 1 + ky.i
     AND X.x = cells.x * 1 - 1 + kx.j
    LEFT JOIN "d_l002_relu_6" AS D ON D.n = cells.n AND D.c = X.c AND D.y = X.y AND D.x = X.x
    GROUP BY cells.n, cells.c, cells.y, cells.x
)
SELECT n, c, CAST(y AS INTEGER) AS y, CAST(x AS INTEGER) AS x,
       CAST(s / (
           (least(y * 1 - 1 + 3, 8 + 1 * 0)
            - greatest(y * 1 - 1, -1 * 0))
         * (least(x * 1 - 1 + 3, 9 + 1 * 0)
            - greatest(x * 1 - 1, -1 * 0))
       ) AS FLOAT) AS v
FROM acc;

-- Conv.28 [window rule, deltas/conv2d, changed cells]
CREATE OR REPLACE TEMP TABLE "d_l009_conv_28" AS
WITH dx AS (
    SELECT D.n, D.c, D.y, D.x, CAST(D.v AS DOUBLE) - CAST(X.v AS DOUBLE) AS dv
    FROM "d_l008_averagepool_24" AS D
    JOIN "l008_averagepool_24" AS X ON X.c = D.c AND X.y = D.y AND X.x = D.x
),
taps AS (
    SELECT dx.n, W.o,
           dx.y + 0 - W.ky * 1 AS ty,
           dx.x + 0 - W.kx * 1 AS tx,
           dx.dv * CAST(W.w AS DOUBLE) AS p
    FROM dx
    JOIN "l009_conv_28__w" AS W ON dx.c = (W.o // 4) * 6 + W.c
),
acc AS (
    SELECT n, o, ty // 1 AS y, tx // 1 AS x, sum(p) AS s
    FROM taps
    WHERE ty >= 0 AND tx >= 0 AND ty % 1 = 0 AND tx % 1 = 0
      AND ty < 8 * 1 AND tx < 9 * 1
    GROUP BY ALL
)
SELECT acc.n, acc.o AS c, CAST(acc.y AS INTEGER) AS y, CAST(acc.x AS INTEGER) AS x,
       CAST(CAST(Y.v AS DOUBLE) + acc.s AS FLOAT) AS v
FROM acc
JOIN "l009_conv_28" AS Y ON Y.c = acc.o AND Y.y = acc.y AND Y.x = acc.x;

-- AveragePool.30 [window rule, deltas/avgpool2d, changed cells]
CREATE OR REPLACE TEMP TABLE "d_l010_averagepool_30" AS
WITH cells AS (
    SELECT DISTINCT D.n, D.c, (D.y + 1 - ky.i) // 1 AS y,
                    (D.x + 1 - kx.j) // 1 AS x
    FROM "d_l002_relu_6" AS D
    CROSS JOIN range(3) AS ky(i)
    CROSS JOIN range(3) AS kx(j)
    WHERE D.y + 1 - ky.i >= 0 AND D.x + 1 - kx.j >= 0
      AND (D.y + 1 - ky.i) % 1 = 0 AND (D.x + 1 - kx.j) % 1 = 0
      AND D.y + 1 - ky.i < 8 * 1 AND D.x + 1 - kx.j < 9 * 1
),
acc AS (
    SELECT cells.n, cells.c, cells.y, cells.x, sum(CAST(coalesce(D.v, X.v) AS DOUBLE)) AS s
    FROM cells
    CROSS JOIN range(3) AS ky(i)
    CROSS JOIN range(3) AS kx(j)
    JOIN "l002_relu_6" AS X
      ON X.c = cells.c AND X.y = cells.y * 1 - 1 + ky.i
     AND X.x = cells.x * 1 - 1 + kx.j
    LEFT JOIN "d_l002_relu_6" AS D ON D.n = cells.n AND D.c = X.c AND D.y = X.y AND D.x = X.x
    GROUP BY cells.n, cells.c, cells.y, cells.x
)
SELECT n, c, CAST(y AS INTEGER) AS y, CAST(x AS INTEGER) AS x,
       CAST(s / (
           (least(y * 1 - 1 + 3, 8 + 1 * 1)
            - greatest(y * 1 - 1, -1 * 1))
         * (least(x * 1 - 1 + 3, 9 + 1 * 1)
            - greatest(x * 1 - 1, -1 * 1))
       ) AS FLOAT) AS v
FROM acc;

-- Concat.32 [merge rule, deltas/changed_positions, changed cells]
CREATE OR REPLACE TEMP TABLE "d_l011_concat_32__p1__pos" AS
SELECT DISTINCT n, y, x FROM "d_l004_relu_12"
UNION
SELECT DISTINCT n, y, x FROM "d_l007_relu_22";

-- Concat.32 [merge rule, deltas/patched, changed cells]
CREATE OR REPLACE TEMP TABLE "d_l011_concat_32__p1__a" AS
SELECT P.n, X.c, X.y, X.x, coalesce(D.v, X.v) AS v
FROM "d_l011_concat_32__p1__pos" AS P
JOIN "l004_relu_12" AS X ON X.y = P.y AND X.x = P.x
LEFT JOIN "d_l004_relu_12" AS D ON D.n = P.n AND D.c = X.c AND D.y = X.y AND D.x = X.x;

-- Concat.32 [merge rule, deltas/patched, changed cells]
CREATE OR REPLACE TEMP TABLE "d_l011_concat_32__p1__b" AS
SELECT P.n, X.c, X.y, X.x, coalesce(D.v, X.v) AS v
FROM "d_l011_concat_32__p1__pos" AS P
JOIN "l007_relu_22" AS X ON X.y = P.y AND X.x = P.x
LEFT JOIN "d_l007_relu_22" AS D ON D.n = P.n AND D.c = X.c AND D.y = X.y AND D.x = X.x;

-- Concat.32 [merge rule, views/concat, changed cells]
CREATE OR REPLACE TEMP TABLE "d_l011_concat_32__p1" AS
SELECT n, c, y, x, v FROM "d_l011_concat_32__p1__a"
UNION ALL
SELECT n, c + 4 AS c, y, x, v FROM "d_l011_concat_32__p1__b";

-- Concat.32 [merge rule, deltas/changed_positions, changed cells]
CREATE OR REPLACE TEMP TABLE "d_l011_concat_32__p2__pos" AS
SELECT DISTINCT n, y, x FROM "d_l011_concat_32__p1"
UNION
SELECT DISTINCT n, y, x FROM "d_l009_conv_28";

-- Concat.32 [merge rule, deltas/patched, changed cells]
CREATE OR REPLACE TEMP TABLE "d_l011_concat_32__p2__a" AS
SELECT P.n, X.c, X.y, X.x, coalesce(D.v, X.v) AS v
FROM "d_l011_concat_32__p2__pos" AS P
JOIN "l011_concat_32__p1" AS X ON X.y = P.y AND X.x = P.x
LEFT JOIN "d_l011_concat_32__p1" AS D ON D.n = P.n AND D.c = X.c AND D.y = X.y AND D.x = X.x;

-- Concat.32 [merge rule, deltas/patched, changed cells]
CREATE OR REPLACE TEMP TABLE "d_l011_concat_32__p2__b" AS
SELECT P.n, X.c, X.y, X.x, coalesce(D.v, X.v) AS v
FROM "d_l011_concat_32__p2__pos" AS P
JOIN "l009_conv_28" AS X ON X.y = P.y AND X.x = P.x
LEFT JOIN "d_l009_conv_28" AS D ON D.n = P.n AND D.c = X.c AND D.y = X.y AND D.x = X.x;

-- Concat.32 [merge rule, views/concat, changed cells]
CREATE OR REPLACE TEMP TABLE "d_l011_concat_32__p2" AS
SELECT n, c, y, x, v FROM "d_l011_concat_32__p2__a"
UNION ALL
SELECT n, c + 8 AS c, y, x, v FROM "d_l011_concat_32__p2__b";

-- Concat.32 [merge rule, deltas/changed_positions, changed cells]
CREATE OR REPLACE TEMP TABLE "d_l011_concat_32__pos" AS
SELECT DISTINCT n, y, x FROM "d_l011_concat_32__p2"
UNION
SELECT DISTINCT n, y, x FROM "d_l010_averagepool_30";

-- Concat.32 [merge rule, deltas/patched, changed cells]
CREATE OR REPLACE TEMP TABLE "d_l011_concat_32__a" AS
SELECT P.n, X.c, X.y, X.x, coalesce(D.v, X.v) AS v
FROM "d_l011_concat_32__pos" AS P
JOIN "l011_concat_32__p2" AS X ON X.y = P.y AND X.x = P.x
LEFT JOIN "d_l011_concat_32__p2" AS D ON D.n = P.n AND D.c = X.c AND D.y = X.y AND D.x = X.x;

-- Concat.32 [merge rule, deltas/patched, changed cells]
CREATE OR REPLACE TEMP TABLE "d_l011_concat_32__b" AS
SELECT P.n, X.c, X.y, X.x, coalesce(D.v, X.v) AS v
FROM "d_l011_concat_32__pos" AS P
JOIN "l010_averagepool_30" AS X ON X.y = P.y AND X.x = P.x
LEFT JOIN "d_l010_averagepool_30" AS D ON D.n = P.n AND D.c = X.c AND D.y = X.y AND D.x = X.x;

-- Concat.32 [merge rule, views/concat, changed cells]
CREATE OR REPLACE TEMP TABLE "d_l011_concat_32" AS
SELECT n, c, y, x, v FROM "d_l011_concat_32__a"
UNION ALL
SELECT n, c + 12 AS c, y, x, v FROM "d_l011_concat_32__b";

-- Conv.36 [window rule, deltas/conv2d, changed cells]
CREATE OR REPLACE TEMP TABLE "d_l012_conv_36" AS
WITH dx AS (
    SELECT D.n, D.c, D.y, D.x, CAST(D.v AS DOUBLE) - CAST(X.v AS DOUBLE) AS dv
    FROM "d_l011_concat_32" AS D
    JOIN "l011_concat_32" AS X ON X.c = D.c AND X.y = D.y AND X.x = D.x
),
taps AS (
    SELECT dx.n, W.o,
           dx.y + 1 - W.ky * 1 AS ty,
           dx.x + 1 - W.kx * 1 AS tx,
           dx.dv * CAST(W.w AS DOUBLE) AS p
    FROM dx
    JOIN "l012_conv_36__w" AS W ON dx.c = (W.o // 1) * 1 + W.c
),
acc AS (
    SELECT n, o, ty // 1 AS y, tx // 1 AS x, sum(p) AS s
    FROM taps
    WHERE ty >= 0 AND tx >= 0 AND ty % 1 = 0 AND tx % 1 = 0
      AND ty < 8 * 1 AND tx < 9 * 1
    GROUP BY ALL
)
SELECT acc.n, acc.o AS c, CAST(acc.y AS INTEGER) AS y, CAST(acc.x AS INTEGER) AS x,
       CAST(CAST(Y.v AS DOUBLE) + acc.s AS FLOAT) AS v
FROM acc
JOIN "l012_conv_36" AS Y ON Y.c = acc.o AND Y.y = acc.y AND Y.x = acc.x;

-- HardSwish.38 [pointwise rule, views/hard_swish, changed cells]
CREATE OR REPLACE TEMP TABLE "d_l013_hardswish_38" AS
SELECT * REPLACE (CAST(v * least(greatest(v / 6.0 + 0.5, 0.0), 1.0) AS FLOAT) AS v)
FROM (SELECT * REPLACE (CAST(v AS DOUBLE) AS v) FROM "d_l012_conv_36");

-- GlobalAveragePool.40 [global rule, deltas/patched_all, every cell]
CREATE OR REPLACE TEMP TABLE "d_l014_globalaveragepool_40__in0" AS
SELECT Q.n, X.c, X.y, X.x, coalesce(D.v, X.v) AS v
FROM "q_queries" AS Q
CROSS JOIN "l013_hardswish_38" AS X
LEFT JOIN "d_l013_hardswish_38" AS D ON D.n = Q.n AND D.c = X.c AND D.y = X.y AND D.x = X.x;

-- GlobalAveragePool.40 [global rule, views/global_avgpool, every cell]
CREATE OR REPLACE TEMP TABLE "d_l014_globalaveragepool_40" AS
SELECT n, c, CAST(0 AS INTEGER) AS y, CAST(0 AS INTEGER) AS x, CAST(avg(CAST(v AS DOUBLE)) AS FLOAT) AS v
FROM "d_l014_globalaveragepool_40__in0"
GROUP BY n, c;

-- Conv.44 [full rule, views/conv2d, every cell]
CREATE OR REPLACE TEMP TABLE "d_l015_conv_44" AS
WITH taps AS (
    SELECT X.n, W.o,
           X.y + 0 - W.ky * 1 AS ty,
           X.x + 0 - W.kx * 1 AS tx,
           CAST(X.v AS DOUBLE) * CAST(W.w AS DOUBLE) AS p
    FROM "d_l014_globalaveragepool_40" AS X
    JOIN "l015_conv_44__w" AS W ON X.c = (W.o // 18) * 18 + W.c
),
acc AS (
    SELECT n, o, ty // 1 AS y, tx // 1 AS x, sum(p) AS s
    FROM taps
    WHERE ty >= 0 AND tx >= 0 AND ty % 1 = 0 AND tx % 1 = 0
      AND ty < 1 * 1 AND tx < 1 * 1
    GROUP BY ALL
),
grid AS (
    SELECT nn.n, B.o, B.b, CAST(gy.y AS INTEGER) AS y, CAST(gx.x AS INTEGER) AS x
    FROM (SELECT DISTINCT n FROM "d_l014_globalaveragepool_40") AS nn
    CROSS JOIN "l015_conv_44__b" AS B
    CROSS JOIN range(1) AS gy(y)
    CROSS JOIN range(1) AS gx(x)
)
SELECT g.n, g.o AS c, g.y, g.x, CAST(coalesce(a.s, 0.0) + g.b AS FLOAT) AS v
FROM grid AS g
LEFT JOIN acc AS a ON a.n = g.n AND a.o = g.o AND a.y = g.y AND a.x = g.x;

-- HardSigmoid.46 [full rule, views/hard_sigmoid, every cell]
CREATE OR REPLACE TEMP TABLE "d_l016_hardsigmoid_46" AS
SELECT * REPLACE (CAST(least(greatest(CAST('0.2' AS DOUBLE) * v + CAST('0.5' AS DOUBLE), 0.0), 1.0) AS FLOAT) AS v)
FROM (SELECT * REPLACE (CAST(v AS DOUBLE) AS v) FROM "d_l015_conv_44");

-- Mul.48 [global rule, deltas/patched_all, every cell]
CREATE OR REPLACE TEMP TABLE "d_l017_mul_48__in0" AS
SELECT Q.n, X.c, X.y, X.x, coalesce(D.v, X.v) AS v
FROM "q_queries" AS Q
CROSS JOIN "l013_hardswish_38" AS X
LEFT JOIN "d_l013_hardswish_38" AS D ON D.n = Q.n AND D.c = X.c AND D.y = X.y AND D.x = X.x;

-- Mul.48 [global rule, views/mul, every cell]
CREATE OR REPLACE TEMP TABLE "d_l017_mul_48" AS
SELECT A.n, greatest(A.c, B.c) AS c, greatest(A.y, B.y) AS y, greatest(A.x, B.x) AS x,
       CAST(CAST(A.v AS DOUBLE) * CAST(B.v AS DOUBLE) AS FLOAT) AS v
FROM "d_l017_mul_48__in0" AS A
JOIN "d_l016_hardsigmoid_46" AS B
  ON A.n = B.n AND A.c * 1 = B.c * 1 AND A.y * 0 = B.y * 0
 AND A.x * 0 = B.x * 0;

-- GlobalAveragePool.50 [global rule, views/global_avgpool, every cell]
CREATE OR REPLACE TEMP TABLE "d_l018_globalaveragepool_50" AS
SELECT n, c, CAST(0 AS INTEGER) AS y, CAST(0 AS INTEGER) AS x, CAST(avg(CAST(v AS DOUBLE)) AS FLOAT) AS v
FROM "d_l017_mul_48"
GROUP BY n, c;

-- Flatten.52 [global rule, views/flatten, every cell]
CREATE OR REPLACE TEMP TABLE "d_l019_flatten_52" AS
SELECT n, CAST((c * 1 + y) * 1 + x AS INTEGER) AS k, v
FROM "d_l018_globalaveragepool_50";

-- Gemm.56 [global rule, views/gemm, every cell]
CREATE OR REPLACE TEMP TABLE "d_l020_gemm_56" AS
WITH acc AS (
    SELECT X.n, W.o, sum(CAST(X.v AS DOUBLE) * CAST(W.w AS DOUBLE)) AS s
    FROM "d_l019_flatten_52" AS X
    JOIN "l020_gemm_56__w" AS W ON X.k = W.k
    GROUP BY X.n, W.o
)
SELECT acc.n, acc.o AS k, CAST(acc.s + B.b AS FLOAT) AS v
FROM acc
JOIN "l020_gemm_56__b" AS B ON acc.o = B.o;

-- Softmax.58 [global rule, views/softmax, every cell]
CREATE OR REPLACE TEMP TABLE "d_l021_softmax_58" AS
WITH z AS (
    SELECT n, k, CAST(v AS DOUBLE) - max(CAST(v AS DOUBLE)) OVER (PARTITION BY n) AS z
    FROM "d_l020_gemm_56"
)
SELECT n, k, CAST(exp(z) / sum(exp(z)) OVER (PARTITION BY n) AS FLOAT) AS v
FROM z;
