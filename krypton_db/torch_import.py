"""PyTorch modules as krypton models: exported once to ONNX through ``torch.onnx`` and cached
by the module's class, weights and input shape (a changed weight is a new file).

torch is an optional extra (``pip install 'krypton_db[torch]'``); it is imported only here,
on use.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import logging
import tempfile
import warnings
from pathlib import Path

from .errors import InputError, ModelError


def is_torch_module(obj) -> bool:
    """Whether ``obj`` is a ``torch.nn.Module`` (checked without importing torch)."""
    return any(c.__module__.startswith("torch.nn") and c.__name__ == "Module"
               for c in type(obj).__mro__)


def module_key(module, input_shape: tuple[int, ...]) -> str:
    """A digest of the module's class (and its source, when Python can read it), its structure
    (``repr``: layer types and their settings, e.g. a ReLU vs a Sigmoid, strides), the input
    shape and every parameter and buffer."""
    h = hashlib.sha256()
    cls = type(module)
    h.update(f"{cls.__module__}.{cls.__qualname__}|{input_shape}|{module!r}".encode())
    try:
        h.update(inspect.getsource(cls).encode())  # a changed forward() is another model
    except (OSError, TypeError):
        pass  # classes defined where no source is kept (an interactive session)
    for name, t in module.state_dict().items():
        a = t.detach().cpu().contiguous().numpy()
        h.update(f"|{name}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:32]


@contextlib.contextmanager
def _quiet():
    """The exporters' progress lines, warnings and log records stay out of the user's
    terminal (a failure still raises, with its message)."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def export_module(module, input_shape, cache: Path) -> Path:
    """The ONNX file of ``module`` for per-sample input ``input_shape`` ([C, H, W]), exported
    in eval mode (the module's own mode is restored) unless already cached."""
    try:
        import torch
    except ImportError:
        raise InputError("a torch.nn.Module needs PyTorch: pip install 'krypton_db[torch]'") \
            from None
    shape = tuple(int(v) for v in (input_shape or ()))
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"a torch module needs input_shape=(C, H, W) of its per-sample input, "
                         f"got {input_shape!r}")
    path = Path(cache) / f"torch-{module_key(module, shape)}.onnx"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = module.training
    module.eval()
    try:
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "module.onnx"
            dummy = torch.zeros((1,) + shape)
            with _quiet():
                try:  # the maintained (dynamo) exporter first, the TorchScript one as fallback
                    torch.onnx.export(module, (dummy,), str(out), dynamo=True, verbose=False,
                                      input_names=["input"], output_names=["output"])
                except Exception:  # noqa: BLE001 - any exporter failure: try the other one
                    torch.onnx.export(module, (dummy,), str(out), dynamo=False,
                                      input_names=["input"], output_names=["output"])
            # one self-contained file (an exporter may put weights in a side file)
            part = path.with_suffix(".part")
            import onnx  # here, not at import: ~1 s of start-up (ml_dtypes)

            onnx.save(onnx.load(str(out)), str(part))
            part.replace(path)  # atomic: never a half file under the cached name
    except Exception as exc:  # noqa: BLE001 - the user's module: name what failed
        raise ModelError(f"torch.onnx could not export {type(module).__name__}: "
                         f"{type(exc).__name__}: {exc}") from None
    finally:
        module.train(was_training)
    return path
