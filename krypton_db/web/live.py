"""Live occlusion: the patch follows the cursor and the page shows the class probabilities
with the patch at that one position, an interactive query on the image's warm views.

One ``LiveProbe`` per WebSocket: ``start`` fixes model, image, patch, colour and target (all
checked by the API's rules), ``probe(y, x)`` answers one position. The socket handler keeps
only the newest position a page asked for while a probe runs (stale requests are dropped,
never queued), so a fast mouse never builds a backlog.
"""

from __future__ import annotations

import time

import numpy as np

from ..api import check_occlude_args, run_checked
from ..errors import InputError
from .jobs import ComputeGate, whole_number
from .store import ViewerStore

TOP = 5  # classes shown beside the target
GATE_WAIT_S = 0.05  # a probe waits this long for a running explanation, then says busy


class LiveProbe:
    """Probes of one model, image and patch (see the module docstring)."""

    def __init__(self, store: ViewerStore, gate: ComputeGate, msg: dict):
        allowed = {"type", "model_id", "image_id", "patch", "color", "target", "precision"}
        unknown = sorted(set(msg) - allowed)
        if unknown:
            raise InputError(f"unknown live option {unknown[0]!r} (allowed: "
                             f"{', '.join(sorted(allowed - {'type'}))})")
        self.store, self.gate = store, gate
        self.model_id = whole_number(msg.get("model_id"), "model")
        self.image_id = whole_number(msg.get("image_id"), "image")
        self.model = store.model(self.model_id)
        _, self.pixels = store.image(self.image_id)
        self.opts = check_occlude_args(self.model, dict(
            patch=msg.get("patch"), stride=1, color=msg.get("color"), target=msg.get("target"),
            positions=[[0, 0]], all_classes=True, precision=msg.get("precision")))
        self.h, self.w = self.model.graph.input_shape[1:]
        self.labels = list(self.model.labels)

    def probe(self, y, x) -> dict:
        """Class probabilities with the patch's top-left corner at (y, x) (model-input pixels;
        clamped so the patch stays inside the input)."""
        ph, pw = self.opts["patch"]
        y = min(max(whole_number(y, "y"), 0), self.h - ph)
        x = min(max(whole_number(x, "x"), 0), self.w - pw)
        if not self.gate.acquire("live occlusion", timeout=GATE_WAIT_S):
            return dict(type="busy", y=y, x=x,
                        message=f"busy: {self.gate.busy or 'another computation'} is running; "
                                "live occlusion resumes when it ends")
        try:
            t0 = time.perf_counter()
            hm = run_checked(self.model, self.pixels, dict(self.opts, positions=[[y, x]]))
            ms = 1e3 * (time.perf_counter() - t0)
        finally:
            self.gate.release()
        probs = np.asarray(hm.all_probs, np.float64).reshape(-1)
        top = np.argsort(-probs, kind="stable")[:TOP]
        return dict(type="probe", y=y, x=x, target=int(hm.target), label=hm.label,
                    prob=float(hm.probs.reshape(-1)[0]), base_prob=float(hm.base_prob),
                    top=[dict(k=int(k), label=self.labels[k], prob=float(probs[k])) for k in top],
                    compute_ms=round(ms, 3), views=hm.stats.get("views"))

    def info(self) -> dict:
        return dict(type="ready", model_id=self.model_id, image_id=self.image_id,
                    patch=list(self.opts["patch"]), input=[self.h, self.w], labels=len(self.labels))
