"""krypton_db: occlusion-based CNN explanations as incremental view maintenance.

Public API (stable names later work builds on):
- :func:`load_model` -> :class:`Model` with ``predict``, ``preprocess``, ``graph``, ``source``
- :func:`sample_image` for real images that ship inside installed packages
"""

from .errors import InputError, KryptonError, ModelError
from .graph import Graph, Node, Op, Preprocess
from .images import sample_image
from .model import Model, load_model

__all__ = [
    "Graph", "InputError", "KryptonError", "Model", "ModelError", "Node", "Op", "Preprocess",
    "load_model", "sample_image",
]
__version__ = "0.1.0"
