"""The local web viewer (``krypton serve``): browse a catalog's runs and heat maps, run
explanations with progress, and live occlusion under the cursor. Needs the ``[web]`` extra
(Starlette, uvicorn, websockets); the rest of krypton_db never imports this package.

Modules: ``store`` (the catalog as the viewer reads and writes it), ``jobs`` (queued
explanations with progress), ``live`` (one-position probes), ``analyze`` (a run's EXPLAIN
ANALYZE), ``app`` (routes and the error rule), ``server`` (127.0.0.1 only), ``static/`` (the
page: plain HTML, CSS and JavaScript, no build step).
"""

from .server import ViewerServer

__all__ = ["ViewerServer"]
