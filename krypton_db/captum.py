"""A drop-in for Captum's ``Occlusion``, computed by exact IVM.

``Occlusion(model).attribute(inputs, sliding_window_shapes, strides, baselines, target)``
has Captum 0.9's signature, defaults, window placement and output (a tensor of the inputs'
shape, dtype and device); ``model`` is a ``torch.nn.Module`` (exported once to ONNX through
``torch.onnx``, cached by its weights and input shape), a krypton :class:`~krypton_db.model.Model`
or anything :func:`~krypton_db.model.load_model` takes. What it cannot do, it refuses with a
clear error rather than computing something else: windows that do not span every channel,
additional forward arguments, several input tensors.

The attributed score is the model's forward output for the target (raw logits for a module
that ends without softmax, probabilities for one that ends with it), as in Captum.
"""

from __future__ import annotations

import numpy as np

from .api import model_inputs, per_sample_targets
from .errors import InputError
from .model import Model, load_model
from .occlusion import window_attribution
from .torch_import import is_torch_module, module_key


def _triple(v, what: str, ndim: int) -> tuple[int, ...]:
    vals = (v,) * ndim if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else v
    if not isinstance(vals, (tuple, list)) or len(vals) != ndim or not all(
            isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 1 for x in vals):
        raise InputError(f"{what} must be a positive int or a tuple of {ndim} positive ints "
                         f"(one per input dimension after the batch), got {v!r}")
    return tuple(int(x) for x in vals)


class Occlusion:
    """Captum's ``Occlusion(forward_func)``; see the module doc."""

    def __init__(self, forward_func, input_shape=None):
        self.forward_func = forward_func
        self._input_shape = input_shape
        self._loaded: dict = {}  # (module digest, input shape) -> Model

    def _model(self, shape: tuple[int, int, int]) -> Model:
        f = self.forward_func
        if isinstance(f, Model):
            m = f
        elif is_torch_module(f):
            key = (module_key(f, shape), shape)  # changed weights: a new export
            m = self._loaded.get(key)
            if m is None:
                m = self._loaded[key] = load_model(f, input_shape=shape)
        else:
            m = self._loaded.get(("source", str(f)))
            if m is None:
                m = self._loaded[("source", str(f))] = load_model(f)
        if m.layout != "NCHW" or tuple(m.input_shape) != shape:
            raise InputError(f"inputs of per-sample shape {shape} do not fit the model's input "
                             f"{tuple(m.input_shape)} ({m.layout}); Captum's inputs are NCHW")
        return m

    def attribute(self, inputs, sliding_window_shapes, strides=None, baselines=None,
                  target=None, additional_forward_args=None, perturbations_per_eval=1,
                  show_progress=False):
        """Attributions of the shape, dtype and device of ``inputs`` (a tuple back for a
        tuple in). ``perturbations_per_eval`` (a batching hint in Captum) and
        ``show_progress`` are accepted; the batches here are sized by memory."""
        as_tuple = isinstance(inputs, tuple)
        if as_tuple:
            if len(inputs) != 1:
                raise InputError(f"the model takes one input tensor, got a tuple of {len(inputs)}")
            (inputs,) = inputs
            # per-input arguments come as 1-tuples with a tuple of inputs (Captum's format)
            if isinstance(sliding_window_shapes, tuple) and len(sliding_window_shapes) == 1 \
                    and isinstance(sliding_window_shapes[0], tuple):
                (sliding_window_shapes,) = sliding_window_shapes
            if isinstance(strides, tuple) and len(strides) == 1 \
                    and isinstance(strides[0], (tuple, int)):
                (strides,) = strides
            if isinstance(baselines, tuple) and len(baselines) == 1:
                (baselines,) = baselines
        if additional_forward_args is not None:
            raise InputError("additional_forward_args are not supported: the model takes the "
                             "input tensor only")
        if not isinstance(perturbations_per_eval, int) or perturbations_per_eval < 1:
            raise InputError(f"perturbations_per_eval must be a positive int, got "
                             f"{perturbations_per_eval!r}")
        if not hasattr(inputs, "shape") or len(inputs.shape) != 4:
            raise InputError(f"inputs must be a 4-D tensor [N, C, H, W], got "
                             f"{getattr(inputs, 'shape', type(inputs).__name__)}")
        n, c, h, w = (int(v) for v in inputs.shape)
        window = _triple(sliding_window_shapes, "sliding_window_shapes", 3)
        if window[0] != c:
            raise InputError(f"sliding windows must span every channel: ({c}, h, w) for these "
                             f"inputs, got {window}; per-channel windows are not supported")
        if window[1] > h or window[2] > w:
            raise InputError(f"sliding window {window} is larger than the inputs' {h}x{w}")
        stride = _triple(1 if strides is None else strides, "strides", 3)
        for dim, (k, st, size) in enumerate(zip(window, stride, (c, h, w))):
            if st > k and k < size:  # Captum's rule: windows may not skip elements
                raise InputError(f"stride {stride} is larger than the window {window} in "
                                 f"dimension {dim + 1} (windows would skip elements)")
        m = self._model((c, h, w))
        if target is None and m.graph.num_classes > 1:
            raise InputError(f"target is needed: the model has {m.graph.num_classes} outputs "
                             f"(an index, or one per sample)")
        samples, _ = model_inputs(m, inputs, baselines)  # [N, ...]: always the batch path
        targets = per_sample_targets(target, n)  # the API's rule: one, or one per input
        score = "prob" if m.ends_in_softmax else "logit"  # the forward output, as Captum sees it
        out = np.empty((n, c, h, w), np.float64)
        for i, (sample, tgt) in enumerate(zip(samples, targets)):
            t = m.class_index(0 if tgt is None else tgt)
            out[i] = window_attribution(m, sample, window[1:], stride[1:], t, score=score)[None]
        return (_like(out, inputs),) if as_tuple else _like(out, inputs)


def _like(a: np.ndarray, inputs):
    """``a`` as the inputs' kind: a torch tensor on their device and dtype, or numpy."""
    if hasattr(inputs, "detach"):
        import torch  # present: the inputs are torch tensors

        return torch.from_numpy(a).to(dtype=inputs.dtype, device=inputs.device)
    return a.astype(np.asarray(inputs).dtype, copy=False)


__all__ = ["Occlusion"]
