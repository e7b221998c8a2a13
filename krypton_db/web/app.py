"""The viewer's HTTP and WebSocket routes (Starlette), the static page, and the error rule.

Error rule: a request that fails on the user's input or the catalog's state answers its
``KryptonError`` message as JSON (``{"error": ...}``: 400, 404 for an unknown id, 409 for a
read-only viewer, 413 for an oversized upload, 503 for a busy catalog); anything else is an
internal error (500, the exception's type and message, traceback on the server's stderr).
Either way the server keeps serving. Every handler that touches the catalog or a model is a
plain ``def`` (Starlette runs those on its thread pool), never blocking the event loop.

Other web pages open in the same browser must not drive the viewer: requests must name a
loopback host (``Host``; defeats DNS rebinding), writes (POST) must carry the ``X-Krypton``
header (a cross-site page cannot add one without a CORS preflight, which is never granted),
and the WebSocket refuses an ``Origin`` that is not this server.
"""

from __future__ import annotations

import asyncio
import json
import time
import traceback
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..catalog_file import CatalogBusyError
from ..errors import InputError, KryptonError
from .analyze import RunAnalyzer
from .jobs import ComputeGate, JobRunner, whole_number
from .live import LiveProbe
from .store import ForbiddenError, ReadOnlyError, UnknownIdError, UploadTooLargeError, ViewerStore

STATIC = Path(__file__).resolve().parent / "static"


class Viewer:
    """The state behind the routes: the catalog store, the compute gate, the job runner."""

    def __init__(self, store: ViewerStore):
        self.store = store
        self.gate = ComputeGate()
        self.jobs = JobRunner(store, self.gate)
        self.analyzer = RunAnalyzer()
        self._base: dict[tuple[int, int, int | None], tuple[int, str, float]] = {}

    def close(self) -> None:
        self.jobs.close()
        self.analyzer.close()
        self.store.close()

    def base(self, model_id: int, image_id: int, target) -> dict:
        """Target class, label and probability of the unoccluded image (cached)."""
        key = (int(model_id), int(image_id), None if target is None else int(target))
        if key not in self._base:
            m = self.store.model(model_id)
            _, px = self.store.image(image_id)
            self.gate.acquire("base prediction")
            try:
                probs = m.predict(m.preprocess(px)[None])[0]
            finally:
                self.gate.release()
            k = int(np.argmax(probs)) if target is None else int(target)
            self._base[key] = (k, m.labels[k], float(probs[k]))
        k, label, p = self._base[key]
        return dict(target=k, label=label, base_prob=p)


def _status(exc: KryptonError) -> int:
    for kind, status in ((CatalogBusyError, 503), (UnknownIdError, 404), (ReadOnlyError, 409),
                         (UploadTooLargeError, 413), (ForbiddenError, 403)):
        if isinstance(exc, kind):
            return status
    return 400


def _message(exc: BaseException) -> str:
    """What the page shows for a failure (the error rule); an internal error's traceback goes
    to the server's stderr."""
    if isinstance(exc, KryptonError):
        return str(exc)
    traceback.print_exception(exc)
    return f"internal error ({type(exc).__name__}): {exc}"


def _error(exc: BaseException) -> JSONResponse:
    status = _status(exc) if isinstance(exc, KryptonError) else 500
    return JSONResponse({"error": _message(exc)}, status_code=status)


LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
WRITE_HEADER = "x-krypton"  # required on POST (see the module docstring)


def _origin_ok(origin: str | None, host: str | None) -> bool:
    """A WebSocket's Origin: absent (not a browser), or this server's own address."""
    if origin is None:
        return True
    return host is not None and origin in (f"http://{host}", f"https://{host}")


def create_app(store: ViewerStore) -> Starlette:
    """The viewer app over ``store`` (``app.state.viewer`` holds its state)."""
    v = Viewer(store)

    def guarded(fn):
        def endpoint(request: Request):
            try:
                return fn(request)
            except Exception as exc:  # noqa: BLE001 - the error rule of the module docstring
                return _error(exc)
        return endpoint

    def pid(request: Request, key: str) -> int:
        return whole_number(request.path_params[key], key)

    def png(data: bytes) -> Response:
        return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})

    @guarded
    def catalog(request: Request):
        return JSONResponse(dict(path=store.path, read_only=store.read_only,
                                 models=store.models(), images=store.images(),
                                 runs=store.runs(), datasets=_jsonable(store.datasets()),
                                 max_upload=store.max_upload))

    @guarded
    def run(request: Request):
        return JSONResponse(store.run(pid(request, "run_id")))

    @guarded
    def run_class(request: Request):
        return JSONResponse(store.grid(pid(request, "run_id"), pid(request, "klass")))

    @guarded
    def base(request: Request):
        q = request.query_params
        target = q.get("target")
        target = None if target in (None, "", "null") else whole_number(target, "target")
        return JSONResponse(v.base(whole_number(q.get("model_id"), "model_id"),
                                   whole_number(q.get("image_id"), "image_id"), target))

    @guarded
    def model_labels(request: Request):
        return JSONResponse(dict(labels=store.labels(pid(request, "model_id"))))

    @guarded
    def input_png(request: Request):
        return png(store.input_png(pid(request, "model_id"), pid(request, "image_id")))

    @guarded
    def thumbnail(request: Request):
        return png(store.thumbnail_png(pid(request, "image_id")))

    @guarded
    def explain_analyze(request: Request):
        return JSONResponse(explain_run(v, pid(request, "run_id")))

    @guarded
    def job(request: Request):
        return JSONResponse(v.jobs.get(request.path_params["job_id"]).view())

    def check_write(request: Request) -> None:
        if request.headers.get(WRITE_HEADER) != "1":
            raise ForbiddenError(f"writes need the header '{WRITE_HEADER}: 1' (the viewer's "
                                 "page sends it; other web pages cannot)")

    async def upload(request: Request):
        try:
            check_write(request)
            name = request.query_params.get("name") or ""
            store.check_writable("upload images")
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > store.max_upload:
                raise UploadTooLargeError(f"the upload is {declared} bytes; the limit is "
                                 f"{store.max_upload}")
            data = bytearray()
            async for chunk in request.stream():
                data += chunk
                if len(data) > store.max_upload:
                    raise UploadTooLargeError(f"the upload is over {store.max_upload} bytes; "
                                              f"the limit is {store.max_upload}")
            return JSONResponse(await run_in_threadpool(store.upload, bytes(data), name))
        except Exception as exc:  # noqa: BLE001 - the error rule
            return _error(exc)

    async def explain(request: Request):
        try:
            check_write(request)
            try:
                body = await request.json()
            except (ValueError, UnicodeDecodeError):
                raise InputError("the explanation request must be a JSON object") from None
            if not isinstance(body, dict):
                raise InputError("the explanation request must be a JSON object")
            store.check_writable("run explanations (their runs are recorded)")
            form = {k: val for k, val in body.items() if k not in ("model_id", "image_id")}
            job = await run_in_threadpool(v.jobs.submit, body.get("model_id"),
                                          body.get("image_id"), form)
            return JSONResponse(job.view())
        except Exception as exc:  # noqa: BLE001 - the error rule
            return _error(exc)

    async def live(ws: WebSocket):
        if not _origin_ok(ws.headers.get("origin"), ws.headers.get("host")):
            await ws.close(code=1008)  # policy violation: another site's page
            return
        await live_socket(v, ws)

    def index(request: Request):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    def favicon(request: Request):
        return Response(status_code=204)

    routes = [
        Route("/", index),
        Route("/favicon.ico", favicon),
        Route("/api/catalog", catalog),
        Route("/api/runs/{run_id}", run),
        Route("/api/runs/{run_id}/classes/{klass}", run_class),
        Route("/api/runs/{run_id}/explain-analyze", explain_analyze),
        Route("/api/base", base),
        Route("/api/models/{model_id}/labels", model_labels),
        Route("/api/models/{model_id}/images/{image_id}/input.png", input_png),
        Route("/api/images/{image_id}/thumb.png", thumbnail),
        Route("/api/uploads", upload, methods=["POST"]),
        Route("/api/explain", explain, methods=["POST"]),
        Route("/api/jobs/{job_id}", job),
        WebSocketRoute("/api/live", live),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    @asynccontextmanager
    async def lifespan(app):
        yield
        v.close()

    app = Starlette(routes=routes, lifespan=lifespan, middleware=[
        Middleware(TrustedHostMiddleware, allowed_hosts=list(LOOPBACK_HOSTS))])
    app.state.viewer = v
    return app


async def live_socket(v: Viewer, ws: WebSocket) -> None:
    """One page's live occlusion (see :mod:`krypton_db.web.live`): a reader task keeps only
    the newest requested position; the prober answers it, then takes the next newest."""
    await ws.accept()
    probe: LiveProbe | None = None
    newest: dict | None = None
    wake = asyncio.Event()
    closed = False

    async def send(obj: dict) -> None:
        await ws.send_text(json.dumps(obj))

    async def reader() -> None:
        nonlocal probe, newest, closed
        try:
            while True:
                try:
                    msg = json.loads(await ws.receive_text())
                    if not isinstance(msg, dict):
                        raise InputError("a live message must be a JSON object")
                except (ValueError, UnicodeDecodeError):
                    await send(dict(type="error", error="a live message must be JSON"))
                    continue
                kind = msg.get("type")
                if kind == "start":
                    newest = None
                    try:
                        probe = await run_in_threadpool(LiveProbe, v.store, v.gate, msg)
                        await send(probe.info())
                    except Exception as exc:  # noqa: BLE001 - the error rule
                        probe = None
                        await send(dict(type="error", error=_message(exc)))
                elif kind == "probe":
                    newest = msg  # an older unanswered position is dropped here
                    wake.set()
                else:
                    await send(dict(type="error",
                                    error=f"unknown live message type {kind!r} (start | probe)"))
        except WebSocketDisconnect:
            pass
        finally:
            closed = True
            wake.set()

    async def prober() -> None:
        nonlocal newest
        while True:
            await wake.wait()
            wake.clear()
            if closed:
                return
            msg, newest = newest, None
            if msg is None:
                continue
            if probe is None:
                await send(dict(type="error",
                                error="send a start message (model_id, image_id, patch) first"))
                continue
            t0 = time.perf_counter()
            try:
                out = await run_in_threadpool(probe.probe, msg.get("y"), msg.get("x"))
            except Exception as exc:  # noqa: BLE001 - the error rule
                out = dict(type="error", error=_message(exc))
            out["seq"] = msg.get("seq")
            out["server_ms"] = round(1e3 * (time.perf_counter() - t0), 3)
            try:
                await send(out)
            except (WebSocketDisconnect, RuntimeError):
                return

    await asyncio.gather(reader(), prober())


def explain_run(v: Viewer, run_id: int) -> dict:
    """EXPLAIN ANALYZE of a recorded run's query, measured now (see
    :mod:`krypton_db.web.analyze`)."""
    info = v.store.run(run_id)
    m = v.store.model(info["model_id"])
    _, px = v.store.image(info["image_id"])
    v.gate.acquire(f"EXPLAIN ANALYZE of run {run_id}")
    try:
        query, rows = v.analyzer.rows(info, m, px)
    finally:
        v.gate.release()
    return dict(query=query, rows=[list(r) for r in rows])


def _jsonable(rows: list[dict]) -> list[dict]:
    return json.loads(json.dumps(rows, default=str))

