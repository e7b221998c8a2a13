-- name: elu
-- inputs: X(*,v)
-- params: alpha
-- output: (*,v)
-- ELU: v for v >= 0, else alpha * (e^v - 1) (computed in DOUBLE).
SELECT * REPLACE (CAST(CASE WHEN v >= 0 THEN CAST(v AS DOUBLE)
                            ELSE {alpha} * (exp(CAST(v AS DOUBLE)) - 1) END AS FLOAT) AS v)
FROM {X}
