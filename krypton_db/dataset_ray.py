"""The Ray backend of ``explain_dataset``: actors that each load the model once and explain
the images the driver sends them (Ray is an optional extra: ``pip install 'krypton_db[ray]'``).

Invariants:
- Each actor keeps one loaded model (executor, compiled kernels, buffers) for all its images,
  with as many threads as CPUs Ray gave it.
- The driver keeps at most ``IN_FLIGHT_PER_WORKER`` images per actor in flight, so its
  memory does not grow with the dataset; it alone writes the catalog.
- An actor that dies has its in-flight images sent to the others (and is replaced, at most
  once per worker started); a retried image rewrites the same Parquet part, so each image
  still lands once.
- A cluster started here binds to 127.0.0.1 only and is stopped at the end; a cluster joined
  by ``address`` (or already connected) is left running.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .dataset_io import DatasetWorker, Job, LoadedImage
from .errors import KryptonError
from .model import Model, load_model

LOOPBACK = "127.0.0.1"
IN_FLIGHT_PER_WORKER = 2
MAX_ATTEMPTS = 3  # an image whose actor died this often is recorded as failed
DEFAULT_CPUS_PER_WORKER = 2
START_TIMEOUT_S = 300.0  # actors that are not up by then (no free CPUs) fail the call


def import_ray():
    # Ray reads this at import (driver and every process it starts): 0 keeps a local
    # instance on 127.0.0.1 instead of the machine's primary interface. Joined clusters are
    # not affected (their address decides).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError as e:
        raise KryptonError("backend='ray' needs Ray: pip install 'krypton_db[ray]'") from e
    return ray


@contextmanager
def connected(address: str | None):
    """Ray, connected: to ``address``, to the cluster this process already joined, or to a
    new local one on the loopback address (stopped on exit)."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    if address is not None:
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise KryptonError(f"cannot join the Ray cluster at {address!r}: {e}") from e
    else:
        _loopback_only()
        ray.init(address="local", _node_ip_address=LOOPBACK, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def _loopback_only() -> None:
    """A local instance binds to 127.0.0.1 only. The processes Ray starts read the variable
    set in ``import_ray``; a driver that imported Ray before it was set read 1, so the flag
    it was read into is cleared too (Ray otherwise binds the primary interface even with
    ``_node_ip_address``)."""
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


class ExplainActor:
    """The body of one Ray actor: the model, loaded once from the ONNX bytes the driver
    shipped (no shared file system needed), and a :class:`DatasetWorker`."""

    def __init__(self, onnx_bytes: bytes, meta: dict, job: Job, name: str):
        import numba
        import ray

        t0 = time.perf_counter()
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        self.threads = max(1, min(int(round(cpus)), numba.config.NUMBA_NUM_THREADS))
        numba.set_num_threads(self.threads)
        self.scratch = Path(tempfile.mkdtemp(prefix="krypton-actor-"))
        path = self.scratch / "model.onnx"
        path.write_bytes(onnx_bytes)
        model = load_model(path, preprocess=meta["preprocess"], labels=meta["labels"],
                           name=meta["name"], conv_algorithms=meta["conv_algorithms"])
        self.worker = DatasetWorker(model, job, name, scratch=self.scratch)
        self.load_s = time.perf_counter() - t0

    def info(self) -> dict:
        return dict(pid=os.getpid(), threads=self.threads, load_s=self.load_s)

    def explain(self, img: LoadedImage) -> dict:
        import numba

        numba.set_num_threads(self.threads)  # numba's thread count is per calling thread
        return dict(self.worker.explain(img), threads=self.threads)


def run_ray(m: Model, job: Job, todo: Iterator[LoadedImage], record, address: str | None,
            workers: int | None, cpus_per_worker: int | None) -> tuple[list[dict], float]:
    """Explain ``todo`` on Ray actors, calling ``record`` on the driver for each image;
    returns the actors started first (name, pid, threads, model load seconds) and the
    seconds until they were ready (cluster start or join, actor start, model load)."""
    t0 = time.perf_counter()
    with connected(address) as ray:
        total = max(1, int(ray.cluster_resources().get("CPU", 1)))
        largest = int(max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]),
                          default=1))
        if cpus_per_worker is None:  # an actor lives on one node
            cpus_per_worker = max(1, min(largest, total // workers if workers is not None
                                         else DEFAULT_CPUS_PER_WORKER))
        if workers is None:
            workers = max(1, total // cpus_per_worker)
        if workers * cpus_per_worker > total:
            raise KryptonError(f"{workers} workers of {cpus_per_worker} CPUs need "
                               f"{workers * cpus_per_worker} CPUs; the cluster has {total}")
        if cpus_per_worker > largest:
            raise KryptonError(f"a worker of {cpus_per_worker} CPUs fits on no node (the "
                               f"largest has {largest}); give cpus_per_worker <= {largest}")
        onnx_ref = ray.put(Path(m.source).read_bytes())
        # the driver's conv algorithms: actors run what it chose, without calibrating again
        algos = m.algorithm_choice.algorithms if m.algorithm_choice is not None else None
        meta = dict(preprocess=m.spec.to_dict(), labels=list(m.labels), name=m.name,
                    conv_algorithms=algos)
        actor_cls = ray.remote(ExplainActor)
        started: list[str] = []

        def start(i: int):
            name = f"krypton-{job.job}-{i}"
            started.append(name)
            return name, actor_cls.options(num_cpus=cpus_per_worker, name=name,
                                           max_restarts=0).remote(onnx_ref, meta, job, name)

        actors = dict(start(i) for i in range(workers))
        try:
            infos = ray.get([a.info.remote() for a in actors.values()],
                            timeout=START_TIMEOUT_S)
        except (ray.exceptions.RayError, TimeoutError) as e:
            for a in actors.values():
                ray.kill(a)
            why = (f"did not start within {START_TIMEOUT_S:g} s (the cluster's free CPUs?)"
                   if isinstance(e, TimeoutError) else f"could not load the model: {e}")
            raise KryptonError(f"a Ray worker {why}") from e
        ready_s = time.perf_counter() - t0
        _dispatch(ray, actors, todo, record, lambda: start(len(started)), workers)
        for a in actors.values():
            ray.kill(a)
        return [dict(name=n, **info) for n, info in zip(started[:workers], infos)], ready_s


def _dispatch(ray, actors: dict, todo: Iterator[LoadedImage], record, start_actor,
              replacements: int) -> None:
    load = {name: 0 for name in actors}
    in_flight: dict = {}  # object ref -> (actor name, image)
    retry: deque[LoadedImage] = deque()
    attempts: dict[str, int] = {}
    exhausted = False

    def next_image() -> LoadedImage | None:
        nonlocal exhausted
        while True:
            if retry:
                return retry.popleft()
            img = None if exhausted else next(todo, None)
            if img is None:
                exhausted = True
                return None
            if img.recovered:
                record.recovered(img)
            elif img.error is not None:
                record(dict(image=img.ref.key, image_sha256=img.sha256, status="failed",
                            error=img.error, seconds=0.0, worker="driver"))
            else:
                return img

    while True:
        for name in list(actors):
            while load[name] < IN_FLIGHT_PER_WORKER:
                img = next_image()
                if img is None:
                    break
                in_flight[actors[name].explain.remote(img)] = (name, img)
                load[name] += 1
        if not in_flight:
            if exhausted and not retry:
                return
            raise KryptonError("every Ray worker died; the images left were not explained")
        (ref,), _ = ray.wait(list(in_flight), num_returns=1)
        name, img = in_flight.pop(ref)
        load[name] -= 1
        try:
            rec = ray.get(ref)
        except ray.exceptions.RayActorError:
            if name in actors:  # first news of this actor's death: replace it once
                del actors[name]
                if replacements > 0:
                    replacements -= 1
                    new_name, handle = start_actor()
                    actors[new_name], load[new_name] = handle, 0
            attempts[img.sha256] = attempts.get(img.sha256, 0) + 1
            if attempts[img.sha256] >= MAX_ATTEMPTS:
                record(dict(image=img.ref.key, image_sha256=img.sha256, status="failed",
                            error=f"its Ray worker died {MAX_ATTEMPTS} times", worker=name))
            else:
                retry.append(img)
            continue
        except ray.exceptions.RayTaskError as e:  # the worker catches image errors; a bug
            rec = dict(image=img.ref.key, image_sha256=img.sha256, status="failed",
                       error=f"worker error: {e}", worker=name)
        rec.pop("threads", None)
        record(rec)
