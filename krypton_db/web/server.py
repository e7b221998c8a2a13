"""Serving the viewer: on 127.0.0.1 only (a socket bound here, handed to uvicorn), in the
foreground (``krypton serve``) or on a background thread (tests, benchmarks, notebooks)."""

from __future__ import annotations

import socket
import threading
import time

from ..errors import InputError

HOST = "127.0.0.1"  # the viewer is a local tool: it never listens on another interface
DEFAULT_PORT = 8765


def _imports():
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        raise InputError(f"the web viewer needs the [web] extra ({exc.name} is missing): "
                         "pip install 'krypton_db[web]'") from None
    return uvicorn, create_app


def bind(port: int) -> socket.socket:
    """A listening socket on 127.0.0.1:``port`` (0: any free port)."""
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise InputError(f"port must be an integer in [0, 65535], got {port!r}")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((HOST, port))
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {HOST}:{port}: {exc.strerror}; choose another "
                         "--port (0 picks a free one)") from None
    sock.listen(128)
    return sock


class ViewerServer:
    """The viewer over a catalog file, served on 127.0.0.1 (``.url``). ``start()`` serves on a
    background thread until ``stop()``; ``serve_forever()`` in the calling thread."""

    def __init__(self, catalog, port: int = DEFAULT_PORT, read_only: bool = False,
                 lock_timeout: float = 5.0, max_upload: int | None = None):
        from .store import DEFAULT_MAX_UPLOAD, ViewerStore

        uvicorn, create_app = _imports()
        self.sock = bind(port)
        try:
            self.store = ViewerStore(catalog, read_only=read_only, lock_timeout=lock_timeout,
                                     max_upload=DEFAULT_MAX_UPLOAD if max_upload is None
                                     else max_upload)
        except BaseException:
            self.sock.close()
            raise
        self.app = create_app(self.store)
        config = uvicorn.Config(self.app, log_level="warning", access_log=False,
                                ws="websockets-sansio", lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{HOST}:{self.port}"
        self._thread: threading.Thread | None = None

    def serve_forever(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.sock.close()

    def start(self, timeout: float = 30.0) -> ViewerServer:
        self._thread = threading.Thread(target=self.serve_forever, name="krypton-viewer",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the viewer did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> ViewerServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
