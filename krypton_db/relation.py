"""Tensors as relations: numpy <-> Arrow <-> DuckDB, bit-exact and without per-element loops.

Invariant: a tensor and its relation hold exactly the same float32 bits. A feature-map batch
``[N, C, H, W]`` is the relation ``(n, c, y, x, v)``; a vector batch ``[N, K]`` is ``(n, k, v)``;
conv weights ``[O, C, kh, kw]`` are ``(o, c, ky, kx, w)``; a bias ``[O]`` is ``(o, b)``; a
per-channel vector ``[C]`` is ``(c, v)``. Keys are INTEGER (Arrow int32), values FLOAT (Arrow
float32). Rows are emitted in C order, but readers never rely on row order: they scatter values
into numpy by their key columns, so any relation produced by SQL reads back correctly.

The *compact* layout stores one row per leading index with the last axis as a DuckDB ARRAY
``FLOAT[W]`` (Arrow fixed-size list): ``(n, c, y, v FLOAT[W])`` for feature maps, ``(n, v
FLOAT[K])`` for vectors. ``FLOAT[W]`` is limited to 100,000 values by DuckDB; longer last axes
use a LIST ``FLOAT[]`` (Arrow list) instead, which has no such limit.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .sqltext import ident

ARRAY_MAX = 100_000  # DuckDB: "ARRAY type size must be at most 100000"

# key column names per tensor kind (the value column is last)
SCHEMAS: dict[str, tuple[str, ...]] = {
    "map": ("n", "c", "y", "x", "v"),
    "vec": ("n", "k", "v"),
    "conv_w": ("o", "c", "ky", "kx", "w"),
    "gemm_w": ("o", "k", "w"),
    "bias": ("o", "b"),
    "channel": ("c", "v"),
}


def _kind_for(ndim: int) -> str:
    if ndim == 4:
        return "map"
    if ndim == 2:
        return "vec"
    if ndim == 1:
        return "channel"
    raise ValueError(f"no default relation schema for a rank-{ndim} tensor; pass names=")


def to_arrow(a: np.ndarray, names: tuple[str, ...] | list[str] | None = None) -> pa.Table:
    """A tensor as a relation: one INTEGER key column per axis plus the FLOAT value column.

    >>> to_arrow(np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3)).column_names
    ['n', 'c', 'y', 'x', 'v']
    """
    a = np.ascontiguousarray(a, dtype=np.float32)
    names = tuple(names) if names is not None else SCHEMAS[_kind_for(a.ndim)]
    if len(names) != a.ndim + 1:
        raise ValueError(f"{len(names)} column names for a rank-{a.ndim} tensor "
                         f"(need {a.ndim + 1})")
    if a.size and max(a.shape) > np.iinfo(np.int32).max:
        raise ValueError(f"axis too long for INTEGER keys: {a.shape}")
    # index columns without a Python loop: np.indices over the shape, raveled in C order
    idx = np.indices(a.shape, dtype=np.int32).reshape(a.ndim, -1)
    cols = [pa.array(idx[i]) for i in range(a.ndim)] + [pa.array(a.reshape(-1))]
    return pa.table(cols, names=list(names))


def from_arrow(table, shape: tuple[int, ...], names: tuple[str, ...] | list[str] | None = None,
               fill: float = np.nan) -> np.ndarray:
    """Scatter a relation back into a float32 tensor of ``shape`` by its key columns.

    Cells missing from the relation get ``fill`` (NaN: a missing cell is a bug made visible).
    """
    table = _as_table(table)
    names = tuple(names) if names is not None else SCHEMAS[_kind_for(len(shape))]
    out = np.full(shape, fill, np.float32)
    if table.num_rows == 0:
        return out
    keys = [_column(table, k).astype(np.int64) for k in names[:-1]]
    for ax, (k, size) in enumerate(zip(keys, shape)):
        if k.min() < 0 or k.max() >= size:
            raise ValueError(f"key {names[ax]} outside [0, {size}) when reading {shape}")
    vals = _column(table, names[-1])
    out[tuple(keys)] = vals.astype(np.float32, copy=False)
    return out


def _as_table(obj) -> pa.Table:
    if isinstance(obj, pa.Table):
        return obj
    if isinstance(obj, pa.RecordBatchReader):
        return obj.read_all()
    if hasattr(obj, "to_arrow_table"):  # a DuckDB relation
        return obj.to_arrow_table()
    raise TypeError(f"expected an Arrow table or DuckDB relation, got {type(obj).__name__}")


def _column(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name)
    if col.null_count:
        raise ValueError(f"column {name} holds NULLs")
    return col.to_numpy()


# -- DuckDB ---------------------------------------------------------------------------------

def store(con, table_name: str, a: np.ndarray, names=None, replace: bool = True) -> None:
    """Create DuckDB table ``table_name`` holding tensor ``a`` as a relation (via Arrow).

    ``table_name`` must be one of our own validated identifiers (see ``sqlviews.ident``).
    """
    arrow = to_arrow(a, names)
    _create_from_arrow(con, ident(table_name), arrow, replace)


def store_arrow(con, table_name: str, table: pa.Table, replace: bool = True) -> None:
    """Create DuckDB table ``table_name`` (our identifier) from an Arrow table."""
    _create_from_arrow(con, ident(table_name), table, replace)


def _create_from_arrow(con, quoted: str, arrow: pa.Table, replace: bool) -> None:
    tmp = f"__krypton_arrow_{id(arrow):x}"
    con.register(tmp, arrow)
    try:
        verb = "CREATE OR REPLACE TABLE" if replace else "CREATE TABLE"
        con.execute(f'{verb} {quoted} AS SELECT * FROM "{tmp}"')
    finally:
        con.unregister(tmp)


def load(con, table_name: str, shape: tuple[int, ...], names=None) -> np.ndarray:
    """Read DuckDB table/view ``table_name`` (one of our identifiers) into a tensor."""
    return from_arrow(con.sql(f"SELECT * FROM {ident(table_name)}").to_arrow_table(), shape, names)


# -- compact layout: one row per leading index, the last axis as FLOAT[W] -------------------

def to_compact(a: np.ndarray) -> pa.Table:
    """``[N, C, H, W]`` -> ``(n, c, y, v FLOAT[W])``; ``[N, K]`` -> ``(n, v FLOAT[K])``.

    The last axis becomes an Arrow fixed-size list (DuckDB ``FLOAT[W]``) when it has at most
    100,000 values, else a variable list (DuckDB ``FLOAT[]``).
    """
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.ndim not in (2, 4):
        raise ValueError(f"compact layout is for [N, C, H, W] or [N, K] tensors, got {a.shape}")
    lead, w = a.shape[:-1], a.shape[-1]
    names = list(SCHEMAS["map"][:3] if a.ndim == 4 else SCHEMAS["vec"][:1])
    idx = np.indices(lead, dtype=np.int32).reshape(len(lead), -1)
    flat = pa.array(a.reshape(-1))
    if w <= ARRAY_MAX:
        values = pa.FixedSizeListArray.from_arrays(flat, w)
    else:
        offsets = pa.array(np.arange(0, a.size + 1, w, dtype=np.int32))
        values = pa.ListArray.from_arrays(offsets, flat)
    return pa.table([pa.array(idx[i]) for i in range(len(lead))] + [values], names=names + ["v"])


def from_compact(table, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`to_compact` (rows in any order)."""
    table = _as_table(table)
    if len(shape) not in (2, 4):
        raise ValueError(f"compact layout is for rank 2 or 4 batches, got {shape}")
    names = SCHEMAS["map"][:3] if len(shape) == 4 else SCHEMAS["vec"][:1]
    w = shape[-1]
    out = np.full(shape, np.nan, np.float32)
    if table.num_rows == 0:
        return out
    col = table.column("v").combine_chunks()
    if col.null_count:
        raise ValueError("compact column v holds NULL arrays")
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if flat.size != table.num_rows * w:
        raise ValueError(f"compact rows do not all hold {w} values")
    rows = flat.reshape(table.num_rows, w)
    keys = tuple(_column(table, k).astype(np.int64) for k in names)
    out[keys] = rows
    return out


def store_compact(con, table_name: str, a: np.ndarray, replace: bool = True) -> None:
    """Create DuckDB table ``table_name`` holding ``a`` in the compact layout."""
    _create_from_arrow(con, ident(table_name), to_compact(a), replace)


def load_compact(con, table_name: str, shape: tuple[int, ...]) -> np.ndarray:
    return from_compact(con.sql(f"SELECT * FROM {ident(table_name)}").to_arrow_table(), shape)
