"""krypton_db: occlusion-based CNN explanations as incremental view maintenance.

Public API (stable names later work builds on):
- :func:`load_model` -> :class:`Model` with ``predict``, ``preprocess``, ``graph``, ``source``
- :func:`occlude` -> heat map (exact IVM or naive), :func:`theoretical_speedup`, :func:`plan`
- :func:`tune` -> tau for the approximate mode (stored per model and domain in the catalog),
  :func:`ssim` -> quality of an approximate heat map against the exact one
- :func:`explain_dataset` -> many images in one call, streamed to Parquet (local or Ray)
- :func:`connect` -> session over the DuckDB catalog (``.sql(text)``)
- :func:`sample_image` for real images that ship inside installed packages
"""

from importlib import import_module
from typing import TYPE_CHECKING

from .errors import InputError, KryptonError, ModelError

# The public names resolve on first use (PEP 562), not at ``import krypton_db``: the package
# import stays light (no numba / duckdb / onnx), so ``python -m krypton_db`` reaches the CLI's
# Ctrl-C and error handling before any heavy module loads.
_LAZY = {
    "Graph": "graph", "Node": "graph", "Op": "graph", "Preprocess": "graph",
    "sample_image": "images", "Model": "model", "load_model": "model",
    "occlude": "api", "plan": "api", "theoretical_speedup": "api", "tune": "api",
    "ssim": "quality", "connect": "session", "explain_dataset": "dataset",
}

__all__ = [
    "Graph", "InputError", "KryptonError", "Model", "ModelError", "Node", "Op", "Preprocess",
    "connect", "explain_dataset", "load_model", "occlude", "plan", "sample_image", "ssim", "theoretical_speedup",
    "tune",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(import_module(f".{module}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):  # a submodule, as ``krypton_db.query`` was after an eager import
        try:
            return import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from .api import occlude, plan, theoretical_speedup, tune
    from .dataset import explain_dataset
    from .graph import Graph, Node, Op, Preprocess
    from .images import sample_image
    from .model import Model, load_model
    from .quality import ssim
    from .session import connect

__version__ = "0.1.0"
