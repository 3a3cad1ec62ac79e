"""Which implementation runs an op: the one place that decides.

``backend`` names one of
  ``"torch"``   the pure-PyTorch reference (``fastkd.reference``): any device, any float dtype;
  ``"triton"``  the Triton kernels (``fastkd.kernels``): CUDA tensors of float16, bfloat16 or float32,
                or CPU tensors when Triton's interpreter is on (``TRITON_INTERPRET=1`` set before
                ``fastkd.kernels`` is first imported), which is how the tests run the kernels without
                a GPU;
  ``"auto"``    (the default) Triton for CUDA tensors it supports, the reference for everything else.
The environment variable ``FASTKD_BACKEND`` replaces ``"auto"`` with the backend it names; a backend
passed explicitly to an op wins over it.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None  # looked up, not imported


def _triton_interpreting() -> bool:
    from fastkd.kernels import INTERPRET

    return INTERPRET


def _check_name(value: object, source: str) -> str:
    if value not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(map(repr, BACKENDS))}; got {value!r}")
    return value


def resolve_backend(backend: str, logits: torch.Tensor) -> str:
    """The backend, ``"torch"`` or ``"triton"``, that runs an op on ``logits``.

    Raises ``ValueError`` for an unknown name or a tensor the named backend cannot run on, ``TypeError``
    for a dtype it does not support, ``RuntimeError`` when Triton is not installed.
    """
    backend = _check_name(backend, "backend")
    if backend == "auto":
        backend = _check_name(os.environ.get("FASTKD_BACKEND", "auto"), "FASTKD_BACKEND")
    if backend == "auto":
        use_triton = logits.is_cuda and logits.dtype in KERNEL_DTYPES and TRITON_AVAILABLE
        return "triton" if use_triton else "torch"
    if backend == "triton":
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
    return backend
