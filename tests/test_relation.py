"""Tensors <-> Arrow <-> DuckDB relations round-trip bit-exactly, in both layouts."""

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from krypton_db import relation
from krypton_db.sqlviews import SqlIdentifierError

# VGG16 (224x224, batch 1): every layer output of the zoo graph, conv+relu counted once each
VGG16_SHAPES = (
    [(64, 224, 224)] * 4 + [(64, 112, 112)]
    + [(128, 112, 112)] * 4 + [(128, 56, 56)]
    + [(256, 56, 56)] * 6 + [(256, 28, 28)]
    + [(512, 28, 28)] * 6 + [(512, 14, 14)]
    + [(512, 14, 14)] * 6 + [(512, 7, 7)]
    + [(25088,), (4096,), (4096,), (4096,), (4096,), (1000,), (1000,)]
)


def special_values(shape, seed=0) -> np.ndarray:
    """Random float32 with -0.0, denormals, +-inf, extremes and a NaN sprinkled in."""
    a = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    flat = a.reshape(-1)
    specials = np.array([-0.0, 0.0, 1e-45, -1e-45, 1.1754942e-38, np.inf, -np.inf,
                         np.finfo(np.float32).max, np.finfo(np.float32).min, np.nan], np.float32)
    k = min(flat.size, specials.size)
    flat[:k] = specials[:k]
    return a


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(
        np.ascontiguousarray(a, np.float32).view(np.uint32),
        np.ascontiguousarray(b, np.float32).view(np.uint32))


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 11), (1, 1, 1, 1), (4,)])
def test_arrow_roundtrip_bit_exact(shape):
    a = special_values(shape)
    t = relation.to_arrow(a)
    assert t.schema.field("v").type == pa.float32()
    assert all(t.schema.field(k).type == pa.int32() for k in t.column_names[:-1])
    assert same_bits(relation.from_arrow(t, shape), a)


def test_duckdb_roundtrip_bit_exact_any_row_order():
    a = special_values((2, 3, 6, 5), seed=1)
    con = duckdb.connect()
    relation.store(con, "t", a)
    types = dict(con.sql("SELECT column_name, column_type FROM (DESCRIBE t)").fetchall())
    assert types == {"n": "INTEGER", "c": "INTEGER", "y": "INTEGER", "x": "INTEGER", "v": "FLOAT"}
    assert same_bits(relation.load(con, "t", a.shape), a)
    # readers scatter by key columns, so SQL may return rows in any order
    shuffled = con.sql("SELECT * FROM t ORDER BY hash(n, c, y, x)").to_arrow_table()
    assert same_bits(relation.from_arrow(shuffled, a.shape), a)
    # -0.0 and denormals survive SQL untouched (no arithmetic)
    neg_zero = con.sql("SELECT v FROM t WHERE n = 0 AND c = 0 AND y = 0 AND x = 0").fetchall()
    assert np.signbit(neg_zero[0][0])


def test_other_schemas():
    con = duckdb.connect()
    w = special_values((8, 3, 3, 3), seed=2)
    relation.store(con, "w", w, relation.SCHEMAS["conv_w"])
    assert con.sql("SELECT * FROM w LIMIT 0").columns == ["o", "c", "ky", "kx", "w"]
    assert same_bits(relation.load(con, "w", w.shape, relation.SCHEMAS["conv_w"]), w)
    b = special_values((8,), seed=3)
    relation.store(con, "b", b, relation.SCHEMAS["bias"])
    assert same_bits(relation.load(con, "b", b.shape, relation.SCHEMAS["bias"]), b)


def test_missing_cells_are_nan_and_bad_keys_fail():
    t = pa.table({"n": pa.array([0], pa.int32()), "k": pa.array([1], pa.int32()),
                  "v": pa.array([2.0], pa.float32())})
    out = relation.from_arrow(t, (1, 3))
    assert out[0, 1] == 2.0 and np.isnan(out[0, 0]) and np.isnan(out[0, 2])
    with pytest.raises(ValueError, match="outside"):
        relation.from_arrow(t, (1, 1))


def test_store_rejects_hostile_table_name():
    con = duckdb.connect()
    with pytest.raises(SqlIdentifierError, match="refusing SQL identifier"):
        relation.store(con, 't"; DROP TABLE x; --', np.zeros((1, 1, 1, 1), np.float32))


def test_compact_roundtrip_image_224():
    img = special_values((1, 3, 224, 224), seed=4)
    t = relation.to_compact(img)
    assert t.num_rows == 3 * 224 and t.schema.field("v").type == pa.list_(pa.float32(), 224)
    con = duckdb.connect()
    relation.store_compact(con, "img", img)
    types = dict(con.sql("SELECT column_name, column_type FROM (DESCRIBE img)").fetchall())
    assert types["v"] == "FLOAT[224]"
    assert same_bits(relation.load_compact(con, "img", img.shape), img)
    # plain SQL sees the pixels: the array element is the same value as in numpy
    got = con.sql("SELECT v[8] FROM img WHERE n = 0 AND c = 2 AND y = 100").fetchall()[0][0]
    assert np.float32(got) == img[0, 2, 100, 7] or (np.isnan(got) and np.isnan(img[0, 2, 100, 7]))


def test_compact_long_vectors_use_list():
    a = special_values((2, 100_001), seed=5)
    t = relation.to_compact(a)
    assert pa.types.is_list(t.schema.field("v").type)
    con = duckdb.connect()
    relation.store_compact(con, "long", a)
    assert same_bits(relation.load_compact(con, "long", a.shape), a)


def test_vgg16_activation_set_fits_compact_layout():
    """All VGG16 layer outputs of one 224x224 image (about 15.2 M floats) in one database."""
    con = duckdb.connect()
    total = 0
    acts = {}
    for i, shape in enumerate(VGG16_SHAPES):
        a = np.random.default_rng(i).normal(size=(1,) + shape).astype(np.float32)
        relation.store_compact(con, f"act{i:02d}", a)
        acts[i] = a
        total += a.size
    assert total > 15_000_000
    for i, a in acts.items():
        assert same_bits(relation.load_compact(con, f"act{i:02d}", a.shape), a)
    rows = con.sql("SELECT count(*) FROM act00").fetchall()[0][0]
    assert rows == 64 * 224  # one row per (n, c, y)


@pytest.mark.slow
def test_real_vgg16_activations_fit_compact_layout():
    from krypton_db import load_model, sample_image
    from krypton_db.exec.cpu import CpuExecutor

    m = load_model("zoo:vgg16")
    x = m.to_nchw(m.preprocess(sample_image("astronaut"))[None])
    names = [n.name for n in m.graph.nodes]
    outs = CpuExecutor(m.graph, fuse=False).run(x, outputs=names)
    con = duckdb.connect()
    for i, name in enumerate(names):
        a = np.asarray(outs[name], np.float32)
        relation.store_compact(con, f"a{i:03d}", a)
        assert same_bits(relation.load_compact(con, f"a{i:03d}", a.shape), a)
