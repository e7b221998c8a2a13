"""Content addresses of files (sha256), computed once per (path, size, mtime) in a process."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

_FILE_DIGESTS: dict[tuple, str] = {}
# A file modified this recently is hashed again on every call, never served from the cache:
# file times tick in coarse steps (the kernel's clock tick), so a rewrite of the same size
# within one step keeps (size, mtime) (git's "racily clean" entries, handled the same way).
RACY_S = 2.0


def file_digest(path) -> str:
    """sha256 hex digest of the file's bytes."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns, st.st_ino)
    cached = _FILE_DIGESTS.get(key)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    if time.time() - st.st_mtime_ns / 1e9 > RACY_S:
        _FILE_DIGESTS[key] = h.hexdigest()
    return h.hexdigest()


def files_digest(paths) -> str:
    """The content address of a model stored in several files (an ONNX file and its external
    data): the one file's ``file_digest`` when there is one (so a single-file model's address
    never changed when external data began to count), else sha256 over each file's name
    relative to the first one's folder and its digest, in order."""
    paths = [Path(p).expanduser().resolve() for p in paths]
    if len(paths) == 1:
        return file_digest(paths[0])
    base = paths[0].parent
    parts = [f"{p.relative_to(base) if p.is_relative_to(base) else p}:{file_digest(p)}" for p in paths]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()
