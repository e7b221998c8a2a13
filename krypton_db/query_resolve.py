"""Binding an ``occlusion(...)`` call against the catalog and planning it (the passes EXPLAIN
VERBOSE shows): a part of :class:`krypton_db.query.Engine`."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from .api import resolve_tau
from .dataset_io import ImageRef, image_refs
from .errors import InputError, KryptonError
from .occlusion import grid_positions, prepare
from .options import OptionValueError, check_against_model
from .planner.batching import resolve_budget
from .planner.explain import fmt_bytes
from .planner.physical import PhysicalPlan
from .sql.dsl import DslBindError
from .sql.dsl.binder import BoundQuery

CATALOG_PREFIX = "catalog:"  # images => 'catalog:<pattern>': registered images by name

# -- binding against the catalog -------------------------------------------------------------------

@dataclass
class Resolved:
    """A bound query resolved against the catalog: model, grid, the plan that will run."""

    bq: BoundQuery
    model: object
    graph: object  # the graph that runs (truncated at the logits for score => 'logit')
    positions: int
    grid: tuple
    tau: float
    tau_note: str
    plan: object | None = None  # final delta plan (None for naive mode: nothing to maintain)
    batch: int = 1
    per_query: int = 0
    image: object | None = None  # the pixels, once read from the catalog for the run
    images: list | None = None  # a dataset query: its images (dataset_io.ImageRef)


class Resolution:
    """Names -> catalog objects, checks that need the model, the plan passes."""

    # -- names -----------------------------------------------------------------------------------
    def model(self, name: str):
        """The loaded latest version of registered model ``name`` (as statements use it)."""
        with self.catalog.connection():
            return self._model(name, name, 0)

    def _model(self, name: str, text: str, pos: int):
        """The latest version of model ``name`` (loaded once per version and session)."""
        if name not in self.catalog.models():
            have = ", ".join(self.catalog.models()) or "none"
            raise DslBindError(f"unknown model {name!r} (registered: {have}); register it with "
                               f"CREATE MODEL {ident_hint(name)} FROM '<file.onnx>'", text, pos)
        model_id = self.catalog.model_id(name)
        m = self._models.get(model_id)
        if m is not None:
            return m
        try:
            m = self.catalog.get_model(name)
        except KryptonError as exc:
            raise DslBindError(str(exc), text, pos) from None
        self._models[model_id] = m
        return m

    def _image(self, name: str, text: str, pos: int):
        if name not in self.catalog.images():
            have = self.catalog.images()
            shown = ", ".join(have[:10]) + (" ..." if len(have) > 10 else "") or "none"
            raise DslBindError(f"unknown image {name!r} (registered: {shown}); register it "
                               f"with CREATE IMAGE {ident_hint(name)} FROM '<file.png>'",
                               text, pos)
        return self.catalog.get_image(name)

    def _check_device(self, device: str, bq, text, pos):
        if device == "cpu":
            return
        from .exec.gpu import gpu_status

        ok, why = gpu_status()
        if not ok:
            msg = (f"device {device!r} is not available: it needs a CUDA GPU and the numba-cuda "
                   f"package; none found: {why} (executors available: cpu)")
            raise bq.error(msg, "device") if bq is not None else DslBindError(msg, text, pos)

    # -- resolve + plan ----------------------------------------------------------------------------
    def resolve(self, bq: BoundQuery) -> Resolved:
        """Names -> catalog objects, model-dependent checks, the plan passes' inputs."""

        # the model at the query's precision: its plan is the one EXPLAIN shows and runs
        m = self._model(bq.model, bq.text, bq.arg_pos.get("model", bq.start)).with_precision(
            bq.precision)
        refs = None
        if bq.images is not None:
            refs = self._dataset_images(bq)
        elif bq.image not in self.catalog.images():
            self._image(bq.image, bq.text, bq.arg_pos.get("image", bq.start))
        c, h, w = m.graph.input_shape
        try:
            check_against_model(dict(patch=bq.patch, positions=bq.positions, region=bq.region,
                                     color=bq.color), c, h, w)
        except OptionValueError as exc:
            raise bq.error(str(exc), exc.option) from None
        if bq.positions is not None:
            n, grid = len(bq.positions), (1, len(bq.positions))
        else:
            try:
                g, grid = grid_positions(h, w, bq.patch, bq.stride, bq.region)
            except InputError as exc:
                raise bq.error(str(exc), "region" if bq.region is not None else "patch") from None
            n = int(grid[0] * grid[1])
        if bq.target is not None:
            try:
                m.class_index(bq.target)
            except InputError as exc:
                raise bq.error(str(exc), "target") from None
        self._check_device(bq.device, bq, bq.text, None)
        nf = self.options.get("naive_from")
        if nf is not None and nf not in m.graph:
            names = [s.node.name for s in m.physical_plan.steps]
            raise DslBindError(f"naive_from: no layer {nf!r} in model {bq.model!r} (layers: "
                               f"{', '.join(names[:8])}{' ...' if len(names) > 8 else ''})",
                               bq.text, bq.start)
        tau, note = self._tau(m, bq)
        graph = m.graph
        if bq.score == "logit":
            graph = graph.truncated(graph.logits_node())
        return Resolved(bq, m, graph, n, grid, tau, note, images=refs)

    def _dataset_images(self, bq) -> list:
        """The images of ``images => ...``: files of a folder or glob, or the registered
        images whose names match ``catalog:<pattern>`` (fnmatch: ``*``, ``?``, ``[..]``)."""
        spec = bq.images
        if spec.startswith(CATALOG_PREFIX):
            pattern = spec[len(CATALOG_PREFIX):] or "*"
            names = [n for n in self.catalog.images() if fnmatch.fnmatchcase(n, pattern)]
            if not names:
                have = self.catalog.images()
                shown = ", ".join(have[:10]) + (" ..." if len(have) > 10 else "") or "none"
                raise bq.error(f"no registered image matches {pattern!r} (registered: {shown})",
                               "images")
            return [ImageRef(n, catalog_name=n) for n in names]
        try:
            return list(image_refs(spec))
        except InputError as exc:
            raise bq.error(str(exc), "images") from None

    def _tau(self, m, bq: BoundQuery) -> tuple[float, str]:
        if bq.mode != "approximate":
            return 1.0, ""
        if bq.tau is not None:
            return bq.tau, "given"
        try:

            tau, src = resolve_tau(m, bq.mode, None, bq.target_ssim, bq.domain, self.catalog)
        except ImportError:  # the facade changed: leave it to run time
            return 1.0, "resolved at run time"
        except KryptonError as exc:
            raise bq.error(str(exc), "target_ssim" if bq.target_ssim is not None else "mode") \
                from None
        return float(tau), str(src)

    def passes(self, r: Resolved) -> list[tuple[str, object]]:
        """The named planning passes, in order: (name, result). The last ones are the plan
        that runs. bind -> plan_deltas -> apply_tau -> force_naive_from -> choose_batch ->
        lower."""

        bq = r.bq
        out: list[tuple[str, object]] = [("bind", self._bind_text(r))]
        cpu_plan = r.model.physical_plan if r.graph is r.model.graph else PhysicalPlan.lower(r.graph)
        # the same preparation the run makes (occlusion.prepare), so EXPLAIN shows what runs
        prep = prepare(r.graph, cpu_plan, bq.patch, mode=bq.mode, positions=r.positions,
                       tau=r.tau, device=bq.device, memory_budget=bq.memory_budget,
                       batch_size=bq.batch_size,
                       disabled=frozenset(self.options.get("disable_rule", ())),
                       rewrite=self._plan_rewrite(), regions=bq.regions)
        (_, p1), (_, p2), (_, p3) = prep.passes
        out += [("plan_deltas", p1), ("apply_tau", p2), ("force_naive_from", p3)]
        per_q, bs = prep.per_query, prep.batch
        r.plan, r.batch, r.per_query = p3, bs, per_q
        out.append(("choose_batch",
                    f"batch size {bs} for {r.positions} positions ({-(-r.positions // bs)} "
                    f"batches): {fmt_bytes(per_q)} per query, budget "
                    f"{fmt_bytes(resolve_budget(bq.mode, bq.memory_budget))}"
                    + (" (batch_size set)" if bq.batch_size else "")))
        out.append(("lower", None))
        return out

    def _bind_text(self, r: Resolved) -> str:
        bq = r.bq
        c, h, w = r.graph.input_shape
        lines = [bq.describe(),
                 f"model {bq.model!r}: graph {r.graph.name}, input {c}x{h}x{w}, "
                 f"{r.graph.num_classes} classes, {len(r.graph.nodes)} nodes",
                 f"positions {r.positions} ({r.grid[0]}x{r.grid[1]} grid)"
                 if bq.positions is None else f"positions {r.positions} (listed)"]
        if bq.mode == "approximate":
            lines.append(f"tau {r.tau:g} ({r.tau_note})")
        sw = []
        if self.options.get("disable_rule"):
            sw.append("disable_rule=" + ",".join(self.options["disable_rule"]))
        if self.options.get("naive_from"):
            sw.append(f"naive_from={self.options['naive_from']}")
        sw.append(f"merge_policy={self.options.get('merge_policy', 'bbox')}")
        lines.append("switches: " + ", ".join(sw))
        return "\n".join(lines)


def ident_hint(name: str) -> str:
    """A name as the language reads it back: bare when an identifier, else quoted."""
    return name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) else "'" + name.replace(
        "'", "''") + "'"
