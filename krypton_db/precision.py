"""Which algorithm each convolution runs: the fastest that keeps the model inside the
precision budget (README "Precision").

Winograd convolutions (F(4x4, 3x3), F(2x2, 3x3), 1-D F(4, r)) are faster than direct ones and
round differently; F(4x4, 3x3) the most (its transforms have entries up to 8). Whether that
matters depends on the model: the brain-MRI VGG16 stays within 3e-7 of ONNX Runtime with every
Winograd algorithm on, random-weight VGG16 on standard-normal inputs moves by up to 4e-5.

The budget is relative to float32 itself. Some models are so sensitive that float32 rounding
alone moves their probabilities by ~1e-5: random-weight VGG16 on standard-normal inputs moves
by 3e-6 to 1.2e-5 when the input changes by one ulp, and the exact twin (every conv direct,
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
   largest first; a binary search finds the shortest prefix that keeps the model inside what
   is allowed, checked by running it (the all-direct end is the twin itself, always inside).

The result is a graph whose conv params carry ``winograd`` caps (``algorithms.ALGORITHM_CAP``),
cached on disk per (model file, CPU, this module's ``VERSION``): a model is calibrated once
per machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from pathlib import Path

import numpy as np

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
    seconds: float  # calibration time (0 when read from the cache)
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


def choose(graph: Graph) -> Choice:
    """The per-conv algorithms (see the module docstring)."""
    t0 = time.perf_counter()
    start = {k: v for k, v in fastest(graph).items() if v != "direct"}
    if not start:
        return Choice({}, 0.0, 0.0, 0.0, 0, 0.0)
    x = calibration_inputs(graph)
    exact = capped(graph, {n: "direct" for n in start})
    prepared: dict = {}  # weights prepared once for every configuration tried
    want = _probs(exact, x, prepared)

    def diff(algos):
        return float(np.abs(_probs(capped(graph, algos), x, prepared) - want).max())

    d0 = diff(start)
    if d0 <= SHARE:  # inside whatever the conditioning adds: skip measuring it
        return Choice(dict(start), d0, SHARE, d0, 0, time.perf_counter() - t0)
    allowed = SHARE + RATIO * conditioning(exact, x, want, prepared)
    if d0 <= allowed:
        return Choice(dict(start), d0, allowed, d0, 0, time.perf_counter() - t0)
    errs = layer_errors(graph, start, x, prepared)
    # a conv's lower rung never comes before its higher one: order by the running max
    keyed = []
    for name, alg0 in start.items():
        alg, key = alg0, float("inf")
        while alg != "direct":
            key = min(key, errs[(name, alg)])
            keyed.append((key, name, _DEMOTE[alg]))
            alg = _DEMOTE[alg]
    keyed.sort(key=lambda t: -t[0])

    def after(k):
        algos = dict(start)
        for _, name, alg in keyed[:k]:
            algos[name] = alg
        return algos

    lo, hi, best = 0, len(keyed), 0.0  # lo: outside what is allowed; hi: inside (the twin)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        d = diff(after(mid))
        if d <= allowed:
            hi, best = mid, d
        else:
            lo = mid
    return Choice(after(hi), best, allowed, d0, hi, time.perf_counter() - t0)


# -- on-disk cache ---------------------------------------------------------------------------
def _cpu() -> str:
    import llvmlite.binding as ll

    return ll.get_host_cpu_name()


def cache_key(file_sha256: str) -> str:
    return hashlib.sha256(f"{file_sha256}:{_cpu()}:{VERSION}:{SHARE}:{RATIO}:{CALIBRATION_SAMPLES}"
                          .encode()).hexdigest()[:40]


def choose_cached(graph: Graph, file_sha256: str, folder: Path) -> Choice:
    """``choose``, read from / written to ``folder`` (one JSON file per model and CPU). A
    cached choice naming other convs than the graph's (a different import) is recomputed."""
    path = folder / f"{cache_key(file_sha256)}.json"
    convs = {n.name for n in graph.nodes if n.op is Op.CONV}
    try:
        rec = json.loads(path.read_text())
        if set(rec["algorithms"]) <= convs and set(rec["algorithms"]) == set(
                k for k, v in fastest(graph).items() if v != "direct"):
            return Choice(rec["algorithms"], rec["max_diff"], rec["allowed"], rec["fastest_diff"],
                          rec["demoted"], rec["seconds"], cached=True)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    choice = choose(graph)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(choice.to_json(), indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:  # a read-only cache: choose again next load
        pass
    return choice


def apply(graph: Graph, file_sha256: str, folder: Path) -> tuple[Graph, Choice | None]:
    """The graph with its per-conv caps (unchanged when ``ENABLED`` is off: None)."""
    if not ENABLED:
        return graph, None
    choice = choose_cached(graph, file_sha256, folder)
    if not choice.algorithms:
        return graph, choice
    return capped(graph, choice.algorithms), choice
