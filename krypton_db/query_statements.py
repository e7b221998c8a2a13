"""The language's catalog and session statements (CREATE MODEL / IMAGE / IMAGES, SET, RESET,
SHOW, CALIBRATE, TUNE): a part of :class:`krypton_db.query.Engine`."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pyarrow as pa

from . import api
from .catalog_datasets import SUMMARY_SQL
from .calibration import CALIBRATION_SUITE, calibrate
from .errors import InputError, KryptonError
from .graph import Op
from .images import deep_pixels, sample_image, to_pil
from .model import load_model
from .options import PREPROCESS_KEYS, OptionValueError, show, unknown_option
from .planner.cost import FEATURES
from .planner.ivm import registry
from .result import Result
from .sql.dsl import DslBindError, check_option
from .sql.dsl import ast as dsl_ast
from .sql.dsl.binder import OPTIONS


class CatalogStatements:
    """``_do_<statement>`` methods of the engine (it dispatches on the statement's type)."""

    # -- our statements --------------------------------------------------------------------------
    def _check_name(self, name: str, text: str, pos: int) -> str:
        if not name or len(name) > 128 or any(ord(ch) < 32 for ch in name):
            raise DslBindError("a name must be 1..128 printable characters", text, pos)
        return name

    def _do_createmodel(self, st: dsl_ast.CreateModel, text: str):
        self._check_name(st.name, text, st.name_pos)
        pre, labels, at = {}, None, {}
        for a in st.options:
            if a.name in PREPROCESS_KEYS:
                pre[a.name] = a.value
                at[a.name] = a.value_pos
            elif a.name == "labels":
                if not isinstance(a.value, tuple) or not all(isinstance(x, str) for x in a.value):
                    raise DslBindError("labels must be a tuple of 'strings'", text, a.value_pos)
                labels = [str(x) for x in a.value]
            else:
                raise DslBindError(unknown_option(a.name, ("labels",) + PREPROCESS_KEYS,
                                                  "model option"), text, a.pos)
        if st.kind == "file":
            p = Path(st.source).expanduser()
            if not p.is_file():
                raise DslBindError(f"no model file {st.source!r}", text, st.source_pos)
            src = str(p)
        else:
            src = ("zoo:" if st.kind == "zoo" else "pkg:") + st.source
        if st.name in self.catalog.models() and not st.replace:
            raise DslBindError(f"model {st.name!r} is already registered (CREATE OR REPLACE "
                               "MODEL replaces it)", text, st.name_pos)
        try:
            m = load_model(src, preprocess=pre or None, labels=labels, name=st.name)
        except OptionValueError as exc:  # the same preprocessing checks as load_model's
            raise DslBindError(str(exc), text, at.get(exc.option, st.source_pos)) from None
        except KryptonError as exc:
            raise DslBindError(str(exc), text, st.source_pos) from None
        model_id = self.catalog.register_model(m, st.name, replace=st.replace)
        self._models[model_id] = m
        return self._rows(["model", "source", "input", "classes", "gmacs"],
                          [(st.name, src, "x".join(map(str, m.graph.input_shape)),
                            m.graph.num_classes, round(m.graph.macs / 1e9, 3))])

    def _register_image(self, source, name: str, replace_: bool):
        deep = deep_pixels(source)  # 16-bit / float / DICOM: stored in full precision
        if deep is not None:
            self.catalog.register_image(source, name, replace=replace_)
            return (name, deep.shape[1], deep.shape[0])
        img = to_pil(source)
        self.catalog.register_image(source if isinstance(source, (str, Path)) else img, name,
                                    replace=replace_)
        return (name, img.width, img.height)

    def _do_createimage(self, st: dsl_ast.CreateImage, text: str):
        self._check_name(st.name, text, st.name_pos)
        if st.name in self.catalog.images() and not st.replace:
            raise DslBindError(f"image {st.name!r} is already registered (CREATE OR REPLACE "
                               "IMAGE replaces it)", text, st.name_pos)
        try:
            if st.kind == "sample":
                src = sample_image(st.source)
            else:
                p = Path(st.source).expanduser()
                if not p.is_file():
                    raise InputError(f"no image file {st.source!r}")
                src = str(p)
            row = self._register_image(src, st.name, st.replace)
        except (KryptonError, OSError) as exc:
            raise DslBindError(str(exc), text, st.source_pos) from None
        return self._rows(["image", "width", "height"], [row])

    def _do_createimages(self, st: dsl_ast.CreateImages, text: str):
        files = sorted(f for f in glob.glob(os.path.expanduser(st.pattern)) if os.path.isfile(f))
        if not files:
            raise DslBindError(f"no files match {st.pattern!r}", text, st.source_pos)
        names = [Path(f).stem for f in files]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise DslBindError(f"several files share the stem {dup[0]!r}", text, st.source_pos)
        have = set(self.catalog.images())
        taken = [n for n in names if n in have]
        if taken and not st.replace:
            raise DslBindError(f"image {taken[0]!r} is already registered (CREATE OR REPLACE "
                               "IMAGES replaces)", text, st.source_pos)
        rows = []
        for f, n in zip(files, names):
            try:
                rows.append(self._register_image(f, n, st.replace))
            except (KryptonError, OSError) as exc:
                raise DslBindError(f"{f}: {exc} ({len(rows)} images registered before it)",
                                   text, st.source_pos) from None
        return self._rows(["image", "width", "height"], rows)

    def _do_setoption(self, st: dsl_ast.SetOption, text: str):
        v = check_option(st.name, st.value, text, st.name_pos, st.value_pos)
        if st.name == "disable_rule":

            known = {o.value for o in Op if o is not Op.INPUT}
            for r in v:
                if r not in known:
                    raise DslBindError(f"unknown layer type {r!r} for disable_rule; layer types: "
                                       f"{', '.join(sorted(known))}", text, st.value_pos)
        if st.name == "device":
            self._check_device(v, None, text, st.value_pos)
        self.options[st.name] = v
        return Result(None)

    def _do_resetoption(self, st: dsl_ast.ResetOption, text: str):
        if st.name == "all":
            self.options.clear()
        else:
            self.options.pop(st.name, None)
        return Result(None)

    def _do_show(self, st: dsl_ast.Show, text: str):
        w = st.what
        if w == "OPTIONS":
            rows = [(k, show(self.options.get(k, o.default)), show(o.default), o.scope, o.doc)
                    for k, o in OPTIONS.items()]
            return self._rows(["option", "value", "default", "scope", "description"], rows)
        if w == "RULES":

            rows = []
            for op in Op:
                if op is Op.INPUT:
                    continue
                r = registry.DELTA_RULES.get(op)
                off = op.value in self.options.get("disable_rule", ())
                rows.append((op.value, type(r).__name__ if r else "FullRecompute",
                             r.kind if r else "global", r.origin if r else "-",
                             "disabled" if off else ("active" if r else "missing")))
            return self._rows(["op", "rule", "kind", "origin", "status"], rows)

        if w == "CACHE":  # the models this session loaded: their materialized-view caches
            rows = []
            for m in self._models.values():
                if m.built_executor is None:
                    continue  # never ran here: no executor, no cache
                c = m.built_executor.view_cache.stats()
                rows.append((m.name, c["entries"], round(c["bytes"] / 2**20, 1),
                             round(c["budget"] / 2**20, 1), c["hits"], c["misses"]))
            return self._rows(["model", "images", "mib", "budget_mib", "hits", "misses"], rows,
                              types={"model": pa.string(), "images": pa.int64(),
                                     "mib": pa.float64(), "budget_mib": pa.float64(),
                                     "hits": pa.int64(), "misses": pa.int64()})
        # every version is listed (a name's latest is the one statements use)
        sql = {"MODELS": "SELECT name, version, source, input_shape, num_classes, macs, "
                         "left(sha256, 12) AS sha256, registered_at FROM models ORDER BY name, version",
               "IMAGES": "SELECT name, version, path, width, height, channels, left(sha256, 12) "
                         "AS sha256, registered_at FROM images ORDER BY name, version",
               "RUNS": "SELECT r.id, m.name AS model, m.version AS model_version, i.name AS image, "
                       "i.version AS image_version, r.mode, r.target_class, r.heatmap_h, "
                       "r.heatmap_w, r.created_at FROM runs r JOIN models m ON "
                       "m.id = r.model_id JOIN images i ON i.id = r.image_id ORDER BY r.id",
               # per dataset: the latest row of each image decides done / failed
               "DATASETS": SUMMARY_SQL}[w]
        return Result(self.con.sql(sql))

    def _do_calibrate(self, st: dsl_ast.Calibrate, text: str):
        """``CALIBRATE``: fit the cost model on the built-in suite (zoo models); ``CALIBRATE
        MODEL m IMAGE i``: on that registered model and image."""

        if st.model is None:
            suite = CALIBRATION_SUITE
        else:
            suite = ((self._model(st.model, text, st.model_pos),
                      self._image(st.image, text, st.image_pos)),)
        res = calibrate(suite)
        return self._rows(list(FEATURES) + ["samples", "rmse_s", "seconds", "path"],
                          [tuple(res["coef"][k] for k in FEATURES)
                           + (res["samples"], res["rmse_s"], res["seconds"], res["path"])])

    def _do_tune(self, st: dsl_ast.Tune, text: str):
        m = self._model(st.model, text, st.model_pos)
        imgs = [self._image(n, text, st.model_pos) for n in st.images]
        kw = {}
        for a in st.options:
            if a.name not in ("target_ssim", "domain", "patch", "stride"):
                raise DslBindError(f"unknown TUNE option {a.name!r}; options: domain, patch, "
                                   "stride, target_ssim", text, a.pos)
            kw[a.name] = check_option(a.name, a.value, text, a.pos, a.value_pos)
        try:
            res = api.tune(m, imgs, catalog=self.catalog, **kw)
        except KryptonError as exc:
            raise DslBindError(str(exc), text, st.start) from None
        return self._rows(["model", "domain", "tau", "target_ssim"],
                          [(st.model, kw.get("domain", "default"), float(res.tau),
                            float(res.target_ssim))])
