"""Model zoo: torchvision-topology CNN classifiers as ONNX, with seeded random weights.

``build(name, seed)`` returns an ``onnx.ModelProto`` for one of ``ZOO``:

* ``vgg16``      -- torchvision ``vgg16`` (no BN), 224x224 input;
* ``resnet18``   -- torchvision ``resnet18``, 224x224 input;
* ``inception3`` -- torchvision ``inception_v3(aux_logits=False,
  transform_input=False)``, 299x299 input.

Channel counts, kernel sizes, strides, pads and concat order follow torchvision
exactly, so parameter counts match torchvision's (BN running statistics are
buffers, not parameters).  Initializers and nodes are named after torchvision's
modules (``features.0.weight``, ``layer1.0.bn1``, ``Mixed_5b.branch1x1.conv``).

Why no torch: the graphs are small, regular and fully specified, so writing
them node by node with ``onnx.helper`` is cheap, avoids a multi-GB dependency
and an exporter whose node naming and folding change between releases, and
gives byte-identical files for the same seed.  The weights are random (no
pretrained download): they only need to make a numerically sane network for
testing the explanation engine.  Conv/FC weights are He-normal with each
output unit's weights made zero-sum (std rescaled to match) -- the job trained
BN statistics do in a real network: a post-ReLU (positive-mean) input adds no
per-channel constant offset, so activations stay well-scaled and keep
depending on the image all the way down.
BatchNormalization nodes are kept as real nodes (importers fold them) with
random gamma/beta/mean/var near identity, and the last FC is scaled so logits
have a std of a few units.

Every graph: input ``input`` float32 ``[N, 3, H, W]`` (symbolic ``N``), the last
FC writes ``logits``, followed by ``Softmax(axis=1)`` -> ``probs`` (the only
output).  Opset 17, IR version 8.  ``metadata_props`` holds
``krypton.preprocess`` (JSON: layout, size, scale, ImageNet mean/std) and
``krypton.labels`` (JSON list ``class_0`` .. ``class_999``).

``zoo_path(name, seed)`` caches the serialized model under ``cache_dir()/zoo``
(outside the repo) and writes it atomically.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

# onnx loads inside the builders, not at import: it costs ~1 s of every process's start-up
# (its ml_dtypes extension), and most processes (the CLI's catalog statements, a cached zoo
# file) never build a model

__all__ = ["ZOO", "input_size", "build", "cache_dir", "zoo_path"]

ZOO = ("vgg16", "resnet18", "inception3")
OPSET = 17
IR_VERSION = 8
NUM_CLASSES = 1000
FORMAT_VERSION = 1  # bump whenever build() output changes: renames cached files
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# Zero-sum weights see only Var(relu(z)) = (1/2 - 1/(2 pi)) Var(z), not E[relu(z)^2]:
# this gain on the He std keeps Var(pre-activation) constant through depth.
_ZS_GAIN = 1.0 / np.sqrt(1.0 - 1.0 / np.pi)
_SIZE = {"vgg16": 224, "resnet18": 224, "inception3": 299}
# Gain on the last FC's He std, tuned so logits std is ~3 on a normalized image.
_HEAD_GAIN = {"vgg16": 0.65, "resnet18": 0.27, "inception3": 1.4}


def _check(name: str) -> None:
    if name not in ZOO:
        raise ValueError(f"unknown model {name!r}; expected one of: {', '.join(ZOO)}")


def input_size(name: str) -> tuple[int, int]:
    """(H, W) of the model's input image."""
    _check(name)
    return (_SIZE[name], _SIZE[name])


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class _Net:
    """Accumulates nodes and initializers; each helper returns its output name."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    # -- parameters --------------------------------------------------------
    def param(self, name: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr, np.float32), name))
        return name

    def he(self, shape, gain: float = 1.0) -> np.ndarray:
        """He-normal weights [out, in, ...], each output unit's weights zero-sum."""
        fan_in = int(np.prod(shape[1:]))
        w = self.rng.standard_normal((shape[0], fan_in), dtype=np.float32)
        w -= w.mean(axis=1, keepdims=True)
        w *= np.float32(gain * np.sqrt(2.0 / fan_in) * _ZS_GAIN * np.sqrt(fan_in / (fan_in - 1)))
        return w.reshape(shape)

    def small(self, n: int, scale: float = 0.01) -> np.ndarray:
        return self.rng.normal(0.0, scale, n).astype(np.float32)

    # -- layers ------------------------------------------------------------
    def node(self, op: str, name: str, inputs, out: str | None = None, **attrs) -> str:
        from onnx import helper

        out = out or name
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=name, **attrs))
        return out

    def conv(self, name, x, cin, cout, k, stride=1, pad=0, bias=True):
        (kh, kw), (ph, pw), (sh, sw) = _pair(k), _pair(pad), _pair(stride)
        ins = [x, self.param(f"{name}.weight", self.he((cout, cin, kh, kw)))]
        if bias:
            ins.append(self.param(f"{name}.bias", self.small(cout)))
        return self.node("Conv", name, ins, kernel_shape=[kh, kw], strides=[sh, sw],
                         pads=[ph, pw, ph, pw], dilations=[1, 1], group=1)

    def bn(self, name, x, c, eps=1e-5):
        r = self.rng
        # gamma ~ U(.75, 1.25), var ~ U(.75, 4/3): E[gamma^2] E[1/var] ~= 1.01, so BN is
        # scale-neutral on average; narrow enough that per-channel gains do not let a
        # few channels' (input-independent) ReLU means dominate the pooled features.
        ins = [x,
               self.param(f"{name}.weight", r.uniform(0.75, 1.25, c)),
               self.param(f"{name}.bias", r.normal(0.0, 0.05, c)),
               self.param(f"{name}.running_mean", r.normal(0.0, 0.05, c)),
               self.param(f"{name}.running_var", r.uniform(0.75, 4 / 3, c))]
        return self.node("BatchNormalization", name, ins, epsilon=eps, momentum=0.9)

    def relu(self, name, x):
        return self.node("Relu", name, [x])

    def maxpool(self, name, x, k, stride, pad=0):
        return self.node("MaxPool", name, [x], kernel_shape=[k, k], strides=[stride, stride],
                         pads=[pad] * 4)

    def avgpool3(self, name, x):  # F.avg_pool2d(x, 3, stride=1, padding=1)
        return self.node("AveragePool", name, [x], kernel_shape=[3, 3], strides=[1, 1],
                         pads=[1, 1, 1, 1], count_include_pad=1)

    def concat(self, name, xs):
        return self.node("Concat", name, xs, axis=1)

    def gemm(self, name, x, fin, fout, out=None, gain=1.0):
        w = self.param(f"{name}.weight", self.he((fout, fin), gain))
        b = self.param(f"{name}.bias", self.small(fout))
        return self.node("Gemm", name, [x, w, b], out=out, transB=1)

    def head(self, name, x, fin, gain):
        """Last FC (output "logits") -> Softmax(axis=1) (output "probs")."""
        x = self.gemm(name, x, fin, NUM_CLASSES, out="logits", gain=gain)
        return self.node("Softmax", "softmax", [x], out="probs", axis=1)

    def basic_conv(self, name, x, cin, cout, k, stride=1, pad=0):
        """Inception BasicConv2d: conv(no bias) + BN(eps=0.001) + ReLU."""
        x = self.conv(f"{name}.conv", x, cin, cout, k, stride, pad, bias=False)
        return self.relu(f"{name}.relu", self.bn(f"{name}.bn", x, cout, eps=0.001))


# ---------------------------------------------------------------------------
def _vgg16(n: _Net, x: str, gain: float) -> str:
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
           512, 512, 512, "M", 512, 512, 512, "M"]
    i, cin = 0, 3
    for v in cfg:
        if v == "M":
            x, i = n.maxpool(f"features.{i}", x, 2, 2), i + 1
        else:
            x = n.conv(f"features.{i}", x, cin, v, 3, 1, 1)
            x, i, cin = n.relu(f"features.{i + 1}", x), i + 2, v
    # avgpool = AdaptiveAvgPool2d((7, 7)) is the identity on 7x7 maps: omitted.
    x = n.node("Flatten", "flatten", [x], axis=1)
    x = n.relu("classifier.1", n.gemm("classifier.0", x, 512 * 7 * 7, 4096))
    x = n.relu("classifier.4", n.gemm("classifier.3", x, 4096, 4096))  # Dropouts omitted
    return n.head("classifier.6", x, 4096, gain)


def _resnet18(n: _Net, x: str, gain: float) -> str:
    x = n.conv("conv1", x, 3, 64, 7, 2, 3, bias=False)
    x = n.relu("relu", n.bn("bn1", x, 64))
    x = n.maxpool("maxpool", x, 3, 2, 1)
    cin = 64
    for li, cout in enumerate([64, 128, 256, 512], start=1):
        for bi in range(2):
            p, s = f"layer{li}.{bi}", (2 if li > 1 and bi == 0 else 1)
            y = n.conv(f"{p}.conv1", x, cin, cout, 3, s, 1, bias=False)
            y = n.relu(f"{p}.relu", n.bn(f"{p}.bn1", y, cout))
            y = n.bn(f"{p}.bn2", n.conv(f"{p}.conv2", y, cout, cout, 3, 1, 1, bias=False), cout)
            if s != 1 or cin != cout:
                x = n.conv(f"{p}.downsample.0", x, cin, cout, 1, s, 0, bias=False)
                x = n.bn(f"{p}.downsample.1", x, cout)
            x = n.relu(f"{p}.relu_1", n.node("Add", f"{p}.add", [y, x]))
            cin = cout
    x = n.node("GlobalAveragePool", "avgpool", [x])
    x = n.node("Flatten", "flatten", [x], axis=1)
    return n.head("fc", x, 512, gain)


def _inception_a(n, p, x, cin, pool_features):
    b1 = n.basic_conv(f"{p}.branch1x1", x, cin, 64, 1)
    b5 = n.basic_conv(f"{p}.branch5x5_1", x, cin, 48, 1)
    b5 = n.basic_conv(f"{p}.branch5x5_2", b5, 48, 64, 5, pad=2)
    b3 = n.basic_conv(f"{p}.branch3x3dbl_1", x, cin, 64, 1)
    b3 = n.basic_conv(f"{p}.branch3x3dbl_2", b3, 64, 96, 3, pad=1)
    b3 = n.basic_conv(f"{p}.branch3x3dbl_3", b3, 96, 96, 3, pad=1)
    bp = n.basic_conv(f"{p}.branch_pool", n.avgpool3(f"{p}.avg_pool", x), cin, pool_features, 1)
    return n.concat(f"{p}.concat", [b1, b5, b3, bp]), 224 + pool_features


def _inception_b(n, p, x, cin):
    b3 = n.basic_conv(f"{p}.branch3x3", x, cin, 384, 3, stride=2)
    bd = n.basic_conv(f"{p}.branch3x3dbl_1", x, cin, 64, 1)
    bd = n.basic_conv(f"{p}.branch3x3dbl_2", bd, 64, 96, 3, pad=1)
    bd = n.basic_conv(f"{p}.branch3x3dbl_3", bd, 96, 96, 3, stride=2)
    bp = n.maxpool(f"{p}.max_pool", x, 3, 2)
    return n.concat(f"{p}.concat", [b3, bd, bp]), 384 + 96 + cin


def _inception_c(n, p, x, cin, c7):
    b1 = n.basic_conv(f"{p}.branch1x1", x, cin, 192, 1)
    b7 = n.basic_conv(f"{p}.branch7x7_1", x, cin, c7, 1)
    b7 = n.basic_conv(f"{p}.branch7x7_2", b7, c7, c7, (1, 7), pad=(0, 3))
    b7 = n.basic_conv(f"{p}.branch7x7_3", b7, c7, 192, (7, 1), pad=(3, 0))
    bd = n.basic_conv(f"{p}.branch7x7dbl_1", x, cin, c7, 1)
    bd = n.basic_conv(f"{p}.branch7x7dbl_2", bd, c7, c7, (7, 1), pad=(3, 0))
    bd = n.basic_conv(f"{p}.branch7x7dbl_3", bd, c7, c7, (1, 7), pad=(0, 3))
    bd = n.basic_conv(f"{p}.branch7x7dbl_4", bd, c7, c7, (7, 1), pad=(3, 0))
    bd = n.basic_conv(f"{p}.branch7x7dbl_5", bd, c7, 192, (1, 7), pad=(0, 3))
    bp = n.basic_conv(f"{p}.branch_pool", n.avgpool3(f"{p}.avg_pool", x), cin, 192, 1)
    return n.concat(f"{p}.concat", [b1, b7, bd, bp]), 768


def _inception_d(n, p, x, cin):
    b3 = n.basic_conv(f"{p}.branch3x3_1", x, cin, 192, 1)
    b3 = n.basic_conv(f"{p}.branch3x3_2", b3, 192, 320, 3, stride=2)
    b7 = n.basic_conv(f"{p}.branch7x7x3_1", x, cin, 192, 1)
    b7 = n.basic_conv(f"{p}.branch7x7x3_2", b7, 192, 192, (1, 7), pad=(0, 3))
    b7 = n.basic_conv(f"{p}.branch7x7x3_3", b7, 192, 192, (7, 1), pad=(3, 0))
    b7 = n.basic_conv(f"{p}.branch7x7x3_4", b7, 192, 192, 3, stride=2)
    bp = n.maxpool(f"{p}.max_pool", x, 3, 2)
    return n.concat(f"{p}.concat", [b3, b7, bp]), 320 + 192 + cin


def _inception_e(n, p, x, cin):
    def split(name, y):  # 1x3 and 3x1 convs side by side, concatenated
        a = n.basic_conv(f"{name}a", y, 384, 384, (1, 3), pad=(0, 1))
        b = n.basic_conv(f"{name}b", y, 384, 384, (3, 1), pad=(1, 0))
        return n.concat(f"{name}.concat", [a, b])

    b1 = n.basic_conv(f"{p}.branch1x1", x, cin, 320, 1)
    b3 = split(f"{p}.branch3x3_2", n.basic_conv(f"{p}.branch3x3_1", x, cin, 384, 1))
    bd = n.basic_conv(f"{p}.branch3x3dbl_1", x, cin, 448, 1)
    bd = split(f"{p}.branch3x3dbl_3", n.basic_conv(f"{p}.branch3x3dbl_2", bd, 448, 384, 3, pad=1))
    bp = n.basic_conv(f"{p}.branch_pool", n.avgpool3(f"{p}.avg_pool", x), cin, 192, 1)
    return n.concat(f"{p}.concat", [b1, b3, bd, bp]), 2048


def _inception3(n: _Net, x: str, gain: float) -> str:
    x = n.basic_conv("Conv2d_1a_3x3", x, 3, 32, 3, stride=2)
    x = n.basic_conv("Conv2d_2a_3x3", x, 32, 32, 3)
    x = n.basic_conv("Conv2d_2b_3x3", x, 32, 64, 3, pad=1)
    x = n.maxpool("maxpool1", x, 3, 2)
    x = n.basic_conv("Conv2d_3b_1x1", x, 64, 80, 1)
    x = n.basic_conv("Conv2d_4a_3x3", x, 80, 192, 3)
    x = n.maxpool("maxpool2", x, 3, 2)
    c = 192
    for tag, pf in (("5b", 32), ("5c", 64), ("5d", 64)):
        x, c = _inception_a(n, f"Mixed_{tag}", x, c, pf)
    x, c = _inception_b(n, "Mixed_6a", x, c)
    for tag, c7 in (("6b", 128), ("6c", 160), ("6d", 160), ("6e", 192)):
        x, c = _inception_c(n, f"Mixed_{tag}", x, c, c7)
    x, c = _inception_d(n, "Mixed_7a", x, c)
    for tag in ("7b", "7c"):
        x, c = _inception_e(n, f"Mixed_{tag}", x, c)
    x = n.node("GlobalAveragePool", "avgpool", [x])  # dropout omitted (inference)
    x = n.node("Flatten", "flatten", [x], axis=1)
    return n.head("fc", x, c, gain)


_BUILDERS = {"vgg16": _vgg16, "resnet18": _resnet18, "inception3": _inception3}


def build(name: str, seed: int = 0) -> onnx.ModelProto:
    """Build model `name` with weights drawn from numpy's Generator(seed)."""
    from onnx import TensorProto, helper

    _check(name)
    h, w = input_size(name)
    net = _Net(seed)
    out = _BUILDERS[name](net, "input", _HEAD_GAIN[name])
    graph = helper.make_graph(
        net.nodes, name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, h, w])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", NUM_CLASSES])],
        initializer=net.inits,
        value_info=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", NUM_CLASSES])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=IR_VERSION, producer_name="krypton_db.zoo",
                              producer_version=str(FORMAT_VERSION),
                              doc_string=f"torchvision {name} topology, random weights, seed={seed}")
    preprocess = {"layout": "NCHW", "size": [h, w], "scale": 1 / 255,
                  "mean": list(MEAN), "std": list(STD)}
    labels = [f"class_{i}" for i in range(NUM_CLASSES)]
    helper.set_model_props(model, {"krypton.preprocess": json.dumps(preprocess),
                                   "krypton.labels": json.dumps(labels)})
    return model


def cache_dir() -> Path:
    """Root cache folder: $KRYPTON_CACHE, else $XDG_CACHE_HOME/krypton_db, else
    ~/.cache/krypton_db.  Not created here; zoo files live in its "zoo" subfolder."""
    if os.environ.get("KRYPTON_CACHE"):
        return Path(os.environ["KRYPTON_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "krypton_db"


def zoo_path(name: str, seed: int = 0) -> Path:
    """Path of the cached .onnx for (name, seed); builds and saves it if missing."""
    _check(name)
    path = cache_dir() / "zoo" / f"{name}-seed{seed}-v{FORMAT_VERSION}.onnx"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build(name, seed)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        import onnx

        onnx.save(model, tmp)  # raw_data initializers, no external data (< 2 GB)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
