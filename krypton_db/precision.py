"""Which algorithm each convolution runs: the fastest that keeps the model inside the
precision budget (README "Precision").

Winograd convolutions (F(4x4, 3x3), F(2x2, 3x3), 1-D F(4, r)) are faster than direct ones and
round differently; F(4x4, 3x3) the most (its transforms have entries up to 8). Whether that
matters depends on the model: the brain-MRI VGG16 stays within 3e-7 of ONNX Runtime with every
Winograd algorithm on, random-weight VGG16 on standard-normal inputs moves by up to 4e-5.

The budget is relative to float32 itself. Some models are so sensitive that float32 rounding
alone moves their probabilities by ~1e-5: random-weight VGG16 on standard-normal inputs moves
by 4e-6 to 2e-5 when the input changes by one ulp, and the exact twin (every conv direct,
no Winograd) differs from ONNX Runtime by up to 1.5e-5 (summation order). So a conv may run a
Winograd algorithm when the model's probabilities, on ``CALIBRATION_SAMPLES`` standard-normal
inputs (seeded, never the tests'), stay within ``SHARE + RATIO * noise`` of the exact twin's,
where ``noise`` is how far the twin's probabilities move when every input value changes by
one ulp (``conditioning``). A well-conditioned model (real weights, real images) gets
``SHARE``; an ill-conditioned one about twice what float32 itself does to it. ORT is not a
runtime dependency; tests check the outcome against ORT on other inputs and real images.

The choice (``choose``):
1. every conv at the fastest algorithm ``planner.algorithms`` gives it; if the model is inside
   what is allowed on the calibration inputs, done (one forward pass each way);
2. else each conv's error per rung is measured alone: the rung run on the twin's input to
   that conv, max |difference| from the direct result relative to max |direct|;
3. the demotions (F(4x4) -> F(2x2) -> direct, F(4, r) -> direct) in order of that error,
   largest first (``demotion_order``); a binary search (``first_inside``) finds a prefix
   that keeps the model inside what is allowed while the one-shorter prefix does not, each
   checked by running it (the all-direct end is the twin itself, always inside). The error
   need not fall monotonically with the prefix, so this is the shortest one only where it does.

Every conv gets a cap (``algorithms.ALGORITHM_CAP``), the direct ones too: the incremental
path picks algorithms by patch size, and a conv that is direct at full size (tile waste) could
otherwise run Winograd on patches, which the calibration never measured. Cached on disk per
(model file, CPU, the algorithm switches, this module's settings and ``VERSION``): a model is
calibrated once per machine. Not calibrated (every conv at its fastest algorithm, as with
``ENABLED`` off): models whose calibration outputs are not finite.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from pathlib import Path

import numpy as np

from .errors import ModelError
from .graph import Graph, Op
from .planner import algorithms

SHARE = 2e-6  # what the chosen algorithms may always add over the exact twin's probabilities
RATIO = 2.0  # ... plus this many times the twin's own one-ulp ``conditioning``
CALIBRATION_SAMPLES = 2
CALIBRATION_SEED = 0x6B72_7970  # standard-normal calibration inputs; tests use other seeds
VERSION = 1  # bump when the procedure or a Winograd kernel's rounding changes
# KRYPTON_PRECISION_CHOICE=0: no calibration, every conv at its fastest algorithm (the
# behaviour before the budget; for comparisons in bench / research)
ENABLED = os.environ.get("KRYPTON_PRECISION_CHOICE", "1") != "0"

# each algorithm's next rung down
_DEMOTE = {"winograd4": "winograd2", "winograd2": "direct", "winograd1d": "direct"}


@dataclass(frozen=True)
class Choice:
    """The per-conv algorithms of a model and how they were chosen."""

    algorithms: dict[str, str]  # conv node -> algorithms.conv_algorithm name
    max_diff: float  # max |p - p_exact twin| on the calibration inputs with these algorithms
    allowed: float  # SHARE + RATIO * the twin's conditioning on those inputs
    fastest_diff: float  # the same with every conv at its fastest algorithm
    demoted: int  # demotions applied (0: every conv at its fastest)
    seconds: float  # calibration time when it was made (also when read from the cache)
    cached: bool = False

    def to_json(self) -> dict:
        return {"algorithms": self.algorithms, "max_diff": self.max_diff, "allowed": self.allowed,
                "fastest_diff": self.fastest_diff, "demoted": self.demoted,
                "seconds": self.seconds}


def capped(graph: Graph, algos: dict[str, str]) -> Graph:
    """``graph`` with each conv named in ``algos`` capped at that algorithm."""
    nodes = [dc_replace(n, params={**n.params, "winograd": algorithms.ALGORITHM_CAP[algos[n.name]]})
             if n.op is Op.CONV and n.name in algos else n for n in graph.nodes]
    return graph.replace(nodes, graph.output)


def fastest(graph: Graph) -> dict[str, str]:
    """Each conv's fastest algorithm (ignoring any cap already on it)."""
    free = capped(graph, {n.name: "winograd4" for n in graph.nodes if n.op is Op.CONV})
    return {n.name: algorithms.conv_algorithm(n) for n in free.nodes if n.op is Op.CONV}


def calibration_inputs(graph: Graph) -> np.ndarray:
    return np.random.default_rng(CALIBRATION_SEED).standard_normal(
        (CALIBRATION_SAMPLES,) + tuple(graph.input_shape)).astype(np.float32)


def conditioning(graph: Graph, x: np.ndarray, p: np.ndarray | None = None,
                 prepared: dict | None = None) -> float:
    """max |p(x) - p(x')| where x' is x with every value moved by one ulp (relative 2**-23,
    seeded signs): how far float32 rounding alone moves this graph's probabilities."""
    sign = np.where(np.random.default_rng(CALIBRATION_SEED + 1).random(x.shape) < 0.5, -1, 1)
    x2 = (x * (1 + sign * np.float32(2.0 ** -23))).astype(np.float32)
    p = _probs(graph, x, prepared) if p is None else p
    return float(np.abs(_probs(graph, x2, prepared) - p).max())


def _probs(graph: Graph, x: np.ndarray, prepared: dict | None = None) -> np.ndarray:
    from .exec.cpu import CpuExecutor

    ex = CpuExecutor(graph, prepared=prepared)
    if prepared is not None and not prepared:
        prepared.update(ex.prep)  # the first call prepares, the others share
    y = ex.predict(x)
    if graph[graph.output].op is Op.SOFTMAX:
        return y
    e = np.exp(y - y.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def layer_errors(graph: Graph, start: dict[str, str], x: np.ndarray,
                 prepared: dict | None = None) -> dict[tuple[str, str], float]:
    """{(conv, algorithm): max |y_alg - y_direct| / max |y_direct|} for every rung below each
    conv's ``start`` algorithm that is not direct, each conv run alone on the exact twin's
    input to it (the first calibration sample)."""
    from .exec.cpu import CpuExecutor, to_internal
    from .exec.dense_cpu import conv_cnhw
    from .exec.conv_cpu import ConvWeights

    exact = capped(graph, {n: "direct" for n in start})
    convs = [n for n in exact.nodes if n.op is Op.CONV and start.get(n.name, "direct") != "direct"]
    names = sorted({n.inputs[0] for n in convs})
    ins = CpuExecutor(exact, fuse=False, prepared=prepared).run(x[:1], outputs=names)
    errs = {}
    for node in convs:
        xi = to_internal(ins[node.inputs[0]])
        cw = (prepared or {}).get(node.name) or ConvWeights.of(node)
        want = conv_cnhw(xi, node, cw).astype(np.float64)
        scale = max(float(np.abs(want).max()), np.finfo(np.float32).tiny)
        alg = start[node.name]
        while alg != "direct":
            capped_node = dc_replace(node, params={**node.params, "winograd": algorithms.ALGORITHM_CAP[alg]})
            got = conv_cnhw(xi, capped_node, cw)
            errs[(node.name, alg)] = float(np.abs(got - want).max()) / scale
            alg = _DEMOTE[alg]
    return errs


def demotion_order(start: dict[str, str], errs: dict[tuple[str, str], float]) -> list[tuple[str, str]]:
    """[(conv, the algorithm it is demoted to)] largest error first. A conv's rung is keyed
    by the smallest error of the rungs above it (a running min), so its lower rung never
    comes before its higher one; ties keep conv order."""
    keyed = []
    for name, alg0 in start.items():
        alg, key = alg0, float("inf")
        while alg != "direct":
            key = min(key, errs[(name, alg)])
            keyed.append((key, name, _DEMOTE[alg]))
            alg = _DEMOTE[alg]
    keyed.sort(key=lambda t: -t[0])
    return [(name, alg) for _, name, alg in keyed]


def first_inside(n: int, inside) -> tuple[int, list[int]]:
    """(k, the k probed): with ``inside(0)`` False and ``inside(n)`` True (not probed), a k
    such that ``inside(k)`` and not ``inside(k - 1)``, by binary search."""
    lo, hi, probed = 0, n, []
    while hi - lo > 1:
        mid = (lo + hi) // 2
        probed.append(mid)
        if inside(mid):
            hi = mid
        else:
            lo = mid
    return hi, probed


def choose(graph: Graph) -> Choice:
    """The per-conv algorithms of every conv (see the module docstring)."""
    t0 = time.perf_counter()
    free = fastest(graph)
    start = {k: v for k, v in free.items() if v != "direct"}

    def done(algos, max_diff, allowed, d0, demoted):
        return Choice({**free, **algos}, max_diff, allowed, d0, demoted, time.perf_counter() - t0)

    if not start:
        return done({}, 0.0, 0.0, 0.0, 0)
    x = calibration_inputs(graph)
    exact = capped(graph, {n: "direct" for n in start})
    prepared: dict = {}  # weights prepared once for every configuration tried
    want = _probs(exact, x, prepared)
    diffs: dict[int, float] = {}

    def diff(algos):
        return float(np.abs(_probs(capped(graph, algos), x, prepared) - want).max())

    d0 = diff(start)
    if not (np.isfinite(want).all() and np.isfinite(d0)):  # nothing to measure against
        return done(start, float("nan"), float("nan"), float("nan"), 0)
    if d0 <= SHARE:  # inside whatever the conditioning adds: skip measuring it
        return done(start, d0, SHARE, d0, 0)
    allowed = SHARE + RATIO * conditioning(exact, x, want, prepared)
    if d0 <= allowed:
        return done(start, d0, allowed, d0, 0)
    order = demotion_order(start, layer_errors(graph, start, x, prepared))

    def after(k):
        algos = dict(start)
        algos.update(order[:k])
        return algos

    def inside(k):
        diffs[k] = diff(after(k))
        return diffs[k] <= allowed

    k, _ = first_inside(len(order), inside)
    return done(after(k), diffs.get(k, 0.0), allowed, d0, k)


# -- on-disk cache ---------------------------------------------------------------------------
def _cpu() -> str:
    import llvmlite.binding as ll

    return ll.get_host_cpu_name()


def cache_key(file_sha256: str, free: dict[str, str]) -> str:
    """The cache entry of a model file on this CPU, given its convs' fastest algorithms
    (``fastest``: they follow the Winograd switches) and the direct convs' GEMM switch."""
    from .exec.conv_cpu import GEMM

    parts = [file_sha256, _cpu(), VERSION, SHARE, RATIO, CALIBRATION_SAMPLES, CALIBRATION_SEED,
             GEMM, sorted(free.items())]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:40]


def names_every_conv(graph: Graph, algos) -> bool:
    """Whether ``algos`` maps exactly the graph's convs, each to a known algorithm."""
    return (isinstance(algos, dict) and set(algos) == {n.name for n in graph.nodes if n.op is Op.CONV}
            and set(algos.values()) <= set(algorithms.ALGORITHM_CAP))


def choose_cached(graph: Graph, file_sha256: str, folder: Path) -> Choice:
    """``choose``, read from / written to ``folder`` (one JSON file per entry). A record
    that does not name every conv of the graph with a known algorithm is recomputed; a
    model with no Winograd-capable conv writes none."""
    free = fastest(graph)
    path = folder / f"{cache_key(file_sha256, free)}.json"
    try:
        rec = json.loads(path.read_text())
        algos = rec["algorithms"]
        if names_every_conv(graph, algos):
            return Choice(algos, rec["max_diff"], rec["allowed"], rec["fastest_diff"],
                          rec["demoted"], rec["seconds"], cached=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    choice = choose(graph)
    if all(v == "direct" for v in free.values()):
        return choice
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")  # one per writer: atomic replace
        with os.fdopen(fd, "w") as f:
            json.dump(choice.to_json(), f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:  # a read-only cache: choose again next load
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return choice


def apply(graph: Graph, file_sha256: str, folder: Path,
          algos: dict[str, str] | None = None) -> tuple[Graph, Choice | None]:
    """The graph with every conv capped at its chosen algorithm (unchanged when ``ENABLED``
    is off: None). ``algos``: a choice made elsewhere (the driver's, for a Ray actor on
    another machine), applied as given instead of calibrating."""
    if not ENABLED:
        return graph, None
    if algos is not None:
        if not names_every_conv(graph, algos):
            raise ModelError("conv_algorithms must name every convolution of the model, each "
                             f"with one of {', '.join(algorithms.ALGORITHM_CAP)}")
        choice = Choice(dict(algos), float("nan"), float("nan"), float("nan"), 0, 0.0, cached=True)
    else:
        choice = choose_cached(graph, file_sha256, folder)
    return capped(graph, choice.algorithms), choice


def uncapped(graph: Graph) -> Graph:
    """``graph`` without any conv cap: every conv at its fastest algorithm, at full size and
    on patches (the behaviour with ``ENABLED`` off)."""
    nodes = [dc_replace(n, params={k: v for k, v in n.params.items() if k != "winograd"})
             if n.op is Op.CONV else n for n in graph.nodes]
    return graph.replace(nodes, graph.output)
