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

from .errors import InputError, KryptonError, ModelError
from .graph import Graph, Node, Op, Preprocess
from .images import sample_image
from .model import Model, load_model
from .api import occlude, plan, theoretical_speedup, tune
from .quality import ssim
from .session import connect
from .dataset import explain_dataset

__all__ = [
    "Graph", "InputError", "KryptonError", "Model", "ModelError", "Node", "Op", "Preprocess",
    "connect", "explain_dataset", "load_model", "occlude", "plan", "sample_image", "ssim", "theoretical_speedup",
    "tune",
]
__version__ = "0.1.0"
