"""Content addresses of files (sha256), computed once per (path, size, mtime) in a process."""

from __future__ import annotations

import hashlib
from pathlib import Path

_FILE_DIGESTS: dict[tuple, str] = {}


def file_digest(path) -> str:
    """sha256 hex digest of the file's bytes."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _FILE_DIGESTS[key] = h.hexdigest()
    return _FILE_DIGESTS[key]
