"""Explanations the viewer runs: checked before they are queued, run one at a time on one
worker thread (numba's kernels use every core; two runs at once would only share them),
progress and an ETA per job, the result recorded in the catalog.

Invariant: all model computation of the viewer (these jobs, the live probes of
:mod:`krypton_db.web.live`) runs under ``ComputeGate`` so a model's executor, whose buffers
one run reuses for the next, never serves two runs at once.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field

from ..api import check_occlude_args, plan, run_checked
from ..approx import DEFAULT_SPEEDUP
from ..errors import InputError, KryptonError
from ..hooks import OcclusionHooks
from ..occlusion import grid_positions
from ..planner.cost import load_cost_model, predict
from .store import UnknownIdError, ViewerStore

FIELDS = ("patch", "stride", "color", "target", "mode", "region", "tau", "drilldown",
          "precision")
MODES = ("exact", "approximate", "drilldown")


class ComputeGate:
    """One model computation at a time in the viewer; ``busy`` says what holds it."""

    def __init__(self):
        self._lock = threading.Lock()
        self.busy: str | None = None

    def acquire(self, what: str, timeout: float = -1) -> bool:
        if not self._lock.acquire(timeout=timeout):
            return False
        self.busy = what
        return True

    def release(self) -> None:
        self.busy = None
        self._lock.release()


@dataclass
class Job:
    id: int
    model_id: int
    image_id: int
    settings: dict  # what the user asked for (shown back)
    positions: int
    estimate_s: float  # the cost model's prediction for the whole run
    state: str = "queued"  # queued | running | done | failed
    done: int = 0
    total: int = 0
    started: float | None = None
    first_batch: tuple[float, int] | None = None  # (time, positions done) at the first batch
    finished: float | None = None
    run_id: int | None = None
    error: str | None = None
    _opts: dict = field(default_factory=dict, repr=False)
    _drilldown: object = field(default=None, repr=False)
    _tau_source: str | None = field(default=None, repr=False)

    def view(self) -> dict:
        """What the page shows: state, progress, elapsed and the ETA (the cost model's
        estimate until two batches have landed, then the measured rate)."""
        now = time.monotonic()
        elapsed = 0.0 if self.started is None else (self.finished or now) - self.started
        if self.state in ("done", "failed"):
            eta = 0.0
        elif self.first_batch is not None and self.done > self.first_batch[1]:
            # the rate since the first batch: it leaves out materializing the views
            t1, d1 = self.first_batch
            eta = (now - t1) / (self.done - d1) * (self.total - self.done)
        elif math.isfinite(self.estimate_s):
            eta = max(self.estimate_s - elapsed, 0.0)
        else:
            eta = None
        return dict(id=self.id, state=self.state, done=self.done, total=self.total or
                    self.positions, positions=self.positions, elapsed_s=round(elapsed, 3),
                    eta_s=None if eta is None else round(eta, 3),
                    estimate_s=round(self.estimate_s, 6) if math.isfinite(self.estimate_s)
                    else None,
                    run_id=self.run_id, error=self.error, settings=self.settings,
                    model_id=self.model_id, image_id=self.image_id)


class JobRunner:
    """Queue and run explanation jobs (see the module docstring)."""

    def __init__(self, store: ViewerStore, gate: ComputeGate):
        self.store, self.gate = store, gate
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="krypton-viewer-jobs",
                                        daemon=True)
        self._thread.start()

    def submit(self, model_id, image_id, form: dict) -> Job:
        """Check the request (the API's own option checks) and queue it; raises InputError."""
        unknown = sorted(set(form) - set(FIELDS))
        if unknown:
            raise InputError(f"unknown explanation option {unknown[0]!r} (allowed: "
                             f"{', '.join(FIELDS)})")
        model_id, image_id = whole_number(model_id, "model"), whole_number(image_id, "image")
        m = self.store.model(model_id)
        self.store.image(image_id)  # exists
        mode = form.get("mode") or "exact"
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        drill = None
        if mode == "drilldown":
            drill = form.get("drilldown") or True
        elif form.get("drilldown") is not None:
            raise InputError("drilldown settings (r, speedup) go with mode 'drilldown'")
        tau = form.get("tau")
        opts = check_occlude_args(m, dict(
            patch=form.get("patch"), stride=form.get("stride"), color=form.get("color"),
            target=form.get("target"), mode="exact" if mode == "drilldown" else mode,
            region=form.get("region"), tau=tau, drilldown=drill,
            precision=form.get("precision")))
        tau_v, tau_source = self.store.resolve_tau(m, opts["mode"], opts["tau"])
        opts["tau"] = tau_v
        h, w = m.graph.input_shape[1:]
        _, grid = grid_positions(h, w, opts["patch"], opts["stride"], opts["region"])
        n = int(grid[0] * grid[1])
        est = _estimate(m, opts, n)
        job = Job(next(self._ids), model_id, image_id, dict(form, mode=mode), n, est,
                  _opts=opts, _drilldown=opts["drilldown"], _tau_source=tau_source)
        self._jobs[job.id] = job
        self._queue.put(job)
        return job

    def get(self, job_id) -> Job:
        job = self._jobs.get(whole_number(job_id, "job"))
        if job is None:
            raise UnknownIdError(f"no job {job_id} in this viewer")
        return job

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._run(job)
            except KryptonError as exc:
                job.error, job.state = str(exc), "failed"
            except Exception as exc:  # noqa: BLE001 - a job's failure must not stop the worker
                traceback.print_exc()
                job.error = f"internal error ({type(exc).__name__}): {exc}"
                job.state = "failed"
            finally:
                job.finished = time.monotonic()

    def _run(self, job: Job) -> None:
        m = self.store.model(job.model_id)
        _, px = self.store.image(job.image_id)

        def on_batch(done: int, total: int) -> None:
            if job.first_batch is None:
                job.first_batch = (time.monotonic(), done)
            job.done, job.total = done, total

        self.gate.acquire(f"explanation job {job.id}")
        try:
            job.state, job.started = "running", time.monotonic()
            hm = run_checked(m, px, job._opts, OcclusionHooks(on_batch=on_batch),
                             job._drilldown, job._tau_source)
        finally:
            self.gate.release()
        job.run_id = self.store.record(m, job.image_id, hm, job._opts["color"],
                                       job._opts["region"], "default")
        job.done = job.total = job.total or job.positions
        job.state = "done"

    def close(self) -> None:
        self._queue.put(None)


def _estimate(m, opts: dict, n: int) -> float:
    """The cost model's predicted seconds for the run (drill-down: its target speedup fewer
    positions)."""
    p = plan(m, opts["patch"], opts["tau"] or 1.0)
    positions = float(n)
    if opts["drilldown"] is not None:
        dd = opts["drilldown"] if isinstance(opts["drilldown"], dict) else {}
        positions = n / float(dd.get("speedup", DEFAULT_SPEEDUP))
    try:
        return float(predict(p, "naive" if opts["mode"] == "naive" else opts["mode"],
                             positions, 128, load_cost_model())["predicted_s"])
    except (KeyError, ValueError):
        return math.nan


def whole_number(v, what: str) -> int:
    """An integer (an id, a coordinate) from a request; an InputError naming it otherwise."""
    if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
        raise InputError(f"{what} must be an integer, got {v!r}")
    try:
        return int(v)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{what} must be an integer, got {v!r}") from None
