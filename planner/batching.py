"""Multi-query batching: how many occlusion queries run together in one batched delta plan.

Every query of a batch shares the materialized views; the per-query cost is the peak of the
buffers live at once while a batch runs (``peak_bytes_per_query``: a liveness walk over the
physical steps, like a register allocator's -- each step's output and transient gather /
stitch buffers are allocated, and a value is freed after its last reader, as the executors'
arenas do). The batch is the largest that keeps that peak within the memory budget, capped
(beyond ~48 queries the GEMMs are already large -- measured: no faster at 64 or 128 -- and bigger
batches only add memory) and never larger than the number of queries.
"""

from __future__ import annotations

import math

from krypton_db.graph import Op

from . import algorithms
from .physical import Route, physical_steps

# Bytes of per-batch buffers. Past a few dozen queries per batch the GEMMs are large enough
# (measured: ResNet18 / Inception3 run as fast at batch 54-72 as at 128), and a bounded
# budget keeps exact mode's peak RSS low. Measured in one process, alternating batch sizes
# (2026-11-26, 2-core AVX-512; seconds per explanation, medians of 3):
#   Inception3 (2.4 MB per query): 48: 4.79-5.17 / 54: 4.77 / 64: 5.19 (a last batch of 4)
#              / 36: 4.97 / 27 (a 64 MiB budget's batch): 5.00-5.63 / 16: 5.87;
#   ResNet18 (0.9 MB per query):   48: 2.85 / 44: 3.39 / 40: 3.44 / 32: 3.20 (and 2.68-2.80 s at
#              48 vs 2.84-2.95 s at 64 in alternating processes, peak RSS 446 vs 460 MB);
#   VGG16 (3.2 MB per query):      48: 1.99 / 40 (a 128 MiB budget's batch): 2.10 / 32: 2.07.
# Batches that fill whole 48-column micro-tiles of the GEMMs (the batch is the innermost axis
# of the patch layout) run best. So: the cap 48, and a budget (160 MiB) that lets each zoo
# model reach it; peak RSS at 48 stays below ORT-naive's (bench/RESULTS.md, `exact`).
DEFAULT_MEMORY_BUDGET = 160 << 20
MAX_BATCH = 48


def choose_batch(bytes_per_query: int, n_queries: int, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 max_batch: int = MAX_BATCH) -> int:
    """Batch size under a memory budget.

    >>> choose_batch(4 << 20, 2704, 512 << 20)
    48
    >>> choose_batch(16 << 20, 2704, 512 << 20)
    32
    >>> choose_batch(16 << 20, 5, 512 << 20)
    5
    """
    if memory_budget <= 0:
        raise ValueError(f"memory budget must be positive, got {memory_budget}")
    fit = memory_budget // max(bytes_per_query, 1)
    return int(max(1, min(n_queries, fit, max_batch)))


def peak_bytes_per_query(plan, device: str = "cpu") -> int:
    """Peak float32 bytes one query holds at once while a batch runs ``plan`` (its
    incremental physical steps on ``device``): per step its output plus transient read-in /
    union-box gathers and stitched full tensors, on top of the values still to be read."""

    g = plan.graph
    steps = physical_steps(plan, device)
    last: dict[str, int] = {}
    for idx, op in enumerate(steps):
        for i in op.delta.node.inputs:
            last[i] = idx
    ph, pw = plan.patch
    size = {g.input.name: g.input_shape[0] * ph * pw}
    live = size[g.input.name]
    peak = live
    for idx, op in enumerate(steps):
        ds, node = op.delta, op.delta.node
        patch_out = op.out_patch
        if patch_out and ds.out_size is not None and len(node.shape) == 3:
            out = node.shape[0] * ds.out_size[0] * ds.out_size[1]
        else:
            out = math.prod(node.shape)
        chans = [g[i].shape[0] for i in node.inputs]
        transient = 0
        if op.route is Route.PATCH_WINDOW and ds.read_in is not None:
            transient += chans[0] * ds.read_in[0] * ds.read_in[1]
            transient += _phase_planes(node, chans[0], ds.out_size) if device == "cpu" else 0
        if op.route is Route.PATCH_MERGE and ds.out_size is not None:
            transient += sum(chans) * ds.out_size[0] * ds.out_size[1]
        if op.stitch:
            transient += sum(math.prod(g[i].shape) for i in node.inputs)
        if not patch_out and device == "cpu":
            transient += _dense_transposes(g, node)
        peak = max(peak, live + transient + out)
        live += out
        size[ds.out_name] = out
        for i in set(node.inputs):
            if last.get(i) == idx:
                live -= size.pop(i, 0)
    return 4 * peak


def _dense_transposes(g, node) -> int:
    """Floats per query of a dense CPU conv's or strided max pool's whole-batch transposes
    (``cpu``'s ``dense_in`` / ``dense_out``, which an incremental step takes from its batch
    arena, ``cpu.step_scratch``): the zero-padded input and the output, whole -- the bands cap
    them on large maps, so this bounds them. Routes without them (depthwise, 1x1 stride-1,
    im2col / shifted-window chunks in per-thread scratch) are counted too: an upper bound."""

    p = node.params
    if node.op is Op.CONV and len(node.shape) == 3:
        c, h, w = g[node.inputs[0]].shape
        t, l, b, r = p["pads"]
        if p["groups"] > 1 or (tuple(p["kernel"]) == (1, 1) and tuple(p["stride"]) == (1, 1) and not any(p["pads"])):
            return 0
        return c * (h + t + b) * (w + l + r) + math.prod(node.shape)
    if node.op is Op.MAXPOOL and len(node.shape) == 3 and tuple(p["stride"]) != (1, 1):
        return math.prod(g[node.inputs[0]].shape) + math.prod(node.shape)
    return 0


def _phase_planes(node, c: int, out_size) -> int:
    """Floats per query of a strided conv's phase planes on the CPU (``patch_cpu.conv_chwb``
    builds them from the read-in context), else 0."""
    if node.op is not Op.CONV or out_size is None:
        return 0
    p = node.params
    if not algorithms.by_phase_planes(p):
        return 0
    (kh, kw), (sh, sw) = p["kernel"], p["stride"]
    phases, _, hp, wp = algorithms.polyphase_taps(kh, kw, sh, sw, out_size[0], out_size[1], 1)
    return c * len(phases) * hp * wp


NAIVE_MAX_BATCH = 16  # full re-inference: batches of 16 occluded images (as ORT-naive runs)
# Naive re-inference is the baseline the speedups are measured against: under the default
# budget it gets room for its batches of 16 (VGG16 at 224: 16 x 38.5 MB), as in the benchmark
# protocol. With a 64 MiB budget it ran one image per batch, 3x slower per
# image, which inflated `krypton demo`'s "speedup over naive". A budget given explicitly
# (any value, the incremental default included) applies as given.
NAIVE_DEFAULT_BUDGET = 768 << 20


def naive_bytes_per_query(graph) -> int:
    """Buffers one occluded image holds in full re-inference: the largest activation, three
    times (input, output and a scratch of the widest step)."""
    return 3 * 4 * max(math.prod(n.shape) for n in graph.nodes)


def resolve_budget(mode: str, memory_budget: int | None) -> int:
    """The batch memory budget of a run: the given one, else the mode's default
    (``NAIVE_DEFAULT_BUDGET`` for naive re-inference, ``DEFAULT_MEMORY_BUDGET`` otherwise)."""
    if memory_budget is not None:
        return int(memory_budget)
    return NAIVE_DEFAULT_BUDGET if mode == "naive" else DEFAULT_MEMORY_BUDGET


def batch_for(mode: str, per_query: int, n_queries: int, memory_budget: int | None,
              batch_size: int | None = None) -> int:
    """The batch size a run uses (``occlude`` and EXPLAIN's physical plan alike): the given
    ``batch_size`` (at most the number of queries), else ``choose_batch`` under the budget
    (None: the mode's default, ``resolve_budget``)."""
    if batch_size:
        return int(max(1, min(batch_size, max(n_queries, 1))))
    memory_budget = resolve_budget(mode, memory_budget)
    bs = choose_batch(per_query, n_queries, memory_budget,
                      NAIVE_MAX_BATCH if mode == "naive" else MAX_BATCH)
    return balanced(bs, n_queries)


def balanced(batch: int, n_queries: int) -> int:
    """The same number of batches, about even, in multiples of 16 queries, never above
    ``batch``. Multiples of 16 keep the gathers' 16-query vector blocks and the GEMMs' column
    tiles whole (ResNet18 ran 6% slower at batch 61 than at 64; VGG16's 196 positions ran
    1.99 s as 4 x 48 + 4 but 2.10 s as 4 x 40 + 36, the multiple-of-8 split); and a last
    batch far smaller than the others is avoided where the rounding allows: 196 queries at
    batch 64 run as 3 x 64 + 4 only because 4 x 49 rounds up past the cap.

    >>> balanced(48, 196), balanced(48, 729), balanced(48, 64), balanced(48, 5), balanced(64, 200)
    (48, 48, 32, 5, 64)
    """
    n = max(n_queries, 1)
    nb = -(-n // max(batch, 1))
    even = -(-n // nb)
    return int(min(batch, n, -(-even // 16) * 16))
