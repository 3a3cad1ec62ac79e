"""Which implementation runs an op: the registry of backends, the one place that decides.

A backend is a ``Backend`` entry: its name, the module that implements the ops (the contract in
``fastkd.backends``), imported on first use, a check that refuses the tensors it cannot run with a named
error, and whether ``"auto"`` picks it for a tensor. ``resolve_backend`` returns the implementation
module; the ops call ``impl.<op>`` and compare no names. Registered here:

  ``"torch"``   plain PyTorch (``fastkd.backends.torch``): any device, any float dtype;
  ``"cpu"``     the C++ CPU kernels (``fastkd.backends.cpu`` over csrc/, built by ``fastkd._ext``): CPU tensors
                of float16, bfloat16, float32 or float64, where the extension builds or is installed;
  ``"triton"``  the Triton kernels (``fastkd.backends.triton`` over ``fastkd.kernels``): CUDA tensors of
                float16, bfloat16 or float32, or CPU tensors when Triton's interpreter is on
                (``TRITON_INTERPRET=1`` set before ``fastkd.kernels`` is first imported), which is how the
                tests run the kernels without a GPU;
  ``"cuda"``    experimental: the CUDA C++ kernels (``fastkd.backends.cuda`` over csrc/cuda/, built by
                ``fastkd._cuda_ext``): CUDA tensors of float16, bfloat16 or float32, on request only
                (``"auto"`` never picks it until a GPU run has validated it); what its kernels do not
                cover it hands to the Triton backend (PyTorch without triton).

``"auto"`` (the default) takes the first registered backend whose ``auto`` accepts the tensor: the C++
kernels for CPU tensors (when the extension is available), Triton for the CUDA tensors it supports, else
PyTorch. The environment variable ``FASTKD_BACKEND`` replaces
``"auto"`` with the backend it names; a backend passed explicitly to an op wins over it.
``register_backend`` adds one (before the others for ``"auto"`` when ``first``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None  # looked up, not imported


@dataclass(frozen=True)
class Backend:
    """One implementation of fastkd's ops.

    ``module``: the import path of the module implementing the contract of ``fastkd.backends``.
    ``check(tensor)``: raises a named ``TypeError`` / ``ValueError`` / ``RuntimeError`` for a tensor
    this backend cannot run (the op's main input: logits, or the student's).
    ``auto(tensor)``: whether ``"auto"`` picks this backend for the tensor.
    """

    name: str
    module: str
    check: Callable[[torch.Tensor], None]
    auto: Callable[[torch.Tensor], bool]


def _triton_interpreting() -> bool:
    from fastkd.kernels import INTERPRET

    return INTERPRET


def _check_triton(logits: torch.Tensor) -> None:
    if not TRITON_AVAILABLE:
        raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
    if logits.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"backend='triton' runs float16, bfloat16 and float32 logits, got {logits.dtype}; "
            "use backend='torch' (or 'auto')"
        )
    if not logits.is_cuda and not _triton_interpreting():
        raise ValueError(
            f"backend='triton' runs on CUDA tensors, but logits are on {logits.device} (to run the "
            "kernels on CPU, set TRITON_INTERPRET=1 before importing fastkd)"
        )


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend, *, first: bool = False) -> None:
    """Add (or replace) a backend; ``first`` puts it before the others in ``"auto"``'s order."""
    if backend.name == "auto":
        raise ValueError("'auto' names the choice among backends, not a backend")
    _REGISTRY.pop(backend.name, None)
    if first:
        entries = dict(_REGISTRY)
        _REGISTRY.clear()
        _REGISTRY[backend.name] = backend
        _REGISTRY.update(entries)
    else:
        _REGISTRY[backend.name] = backend


def unregister_backend(name: str) -> None:
    _REGISTRY.pop(name)


def backend_names() -> tuple[str, ...]:
    """``"auto"`` and the registered backends' names, in ``"auto"``'s order."""
    return ("auto", *_REGISTRY)


register_backend(Backend(
    "triton", "fastkd.backends.triton", _check_triton,
    auto=lambda x: x.is_cuda and x.dtype in KERNEL_DTYPES and TRITON_AVAILABLE,
))  # fmt: skip
register_backend(Backend("torch", "fastkd.backends.torch", check=lambda x: None, auto=lambda x: True))

CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_cpu(logits: torch.Tensor) -> None:
    from fastkd import _ext

    if logits.device.type != "cpu":
        raise ValueError(f"backend='cpu' runs CPU tensors, but logits are on {logits.device}")
    if logits.dtype not in CPU_DTYPES:
        raise TypeError(f"backend='cpu' runs float16, bfloat16, float32 and float64 logits, got {logits.dtype}")
    if not _ext.load():
        raise RuntimeError(f"backend='cpu' needs the C++ extension, which did not build: {_ext.error()}")


def _auto_cpu(logits: torch.Tensor) -> bool:
    if logits.device.type != "cpu" or logits.dtype not in CPU_DTYPES:
        return False
    from fastkd import _ext

    return _ext.load()  # built or loaded once, the outcome cached (one warning when it cannot be)


# The C++ CPU kernels (csrc/, fastkd.backends.cpu): first in "auto"'s order for CPU tensors, where the
# extension builds (fastkd._ext); PyTorch otherwise.
register_backend(Backend("cpu", "fastkd.backends.cpu", _check_cpu, _auto_cpu), first=True)


def _check_cuda(logits: torch.Tensor) -> None:
    from fastkd import _cuda_ext

    if logits.device.type != "cuda":
        why = _cuda_ext.unavailable_reason()
        raise ValueError(
            f"backend='cuda' (experimental) runs CUDA tensors, but logits are on {logits.device}"
            + (f"; CUDA is not available here: {why}" if why else "")
        )
    if logits.dtype not in KERNEL_DTYPES:
        raise TypeError(f"backend='cuda' runs float16, bfloat16 and float32 logits, got {logits.dtype}")
    if not _cuda_ext.load():
        raise RuntimeError(
            f"backend='cuda' needs the CUDA extension, which did not build or load: {_cuda_ext.error()}"
        )


# The CUDA C++ kernels (csrc/cuda/, fastkd.backends.cuda): experimental, opt-in; "auto" never picks them.
register_backend(Backend("cuda", "fastkd.backends.cuda", _check_cuda, auto=lambda x: False))


def check_backend_name(value: object, source: str = "backend") -> str:
    """A registered name or ``"auto"`` (a ValueError listing them otherwise)."""
    names = backend_names()
    if not isinstance(value, str) or value not in names:
        listed = ("auto", *sorted(names[1:]))
        raise ValueError(f"{source} must be one of {', '.join(map(repr, listed))}; got {value!r}")
    return value


def resolve_backend(backend: str, logits: torch.Tensor) -> ModuleType | SimpleNamespace:
    """The implementation module that runs an op on ``logits`` (its ``NAME`` is the backend's name).

    Raises ``ValueError`` for an unknown name, and the backend's own error for a tensor it cannot run
    (``TypeError`` for a dtype, ``ValueError`` for a device, ``RuntimeError`` for a missing package).
    """
    name = check_backend_name(backend)
    if name == "auto":
        name = check_backend_name(os.environ.get("FASTKD_BACKEND", "auto"), "FASTKD_BACKEND")
    if name == "auto":
        name = next(entry.name for entry in _REGISTRY.values() if entry.auto(logits))
    entry = _REGISTRY[name]
    entry.check(logits)
    return implementation(name)


def implementation(name: str) -> ModuleType | SimpleNamespace:
    """The implementation module of the registered backend ``name``, imported on first use.

    While ``torch.compile`` traces a call (which cannot trace an import), a module not imported yet is
    its name alone, ``NAME``: a traced op reaches the backend through its ``torch.library`` op, whose
    body runs eagerly and imports it then."""
    module = sys.modules.get(_REGISTRY[name].module)
    if module is None:
        if torch.compiler.is_compiling():
            return SimpleNamespace(NAME=name)
        module = importlib.import_module(_REGISTRY[name].module)
    return module
