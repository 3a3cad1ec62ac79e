"""Host code every backend shares: the layout the kernels read, temperatures as kernel arguments, the
outputs of the loss's forward and its reduction's scale, and the device a launch runs on.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import Tensor

from fastkd import _memory
from fastkd._options import KDOptions


def unit_column_stride(x: Tensor) -> Tensor:
    """``x`` if its last dimension is contiguous (any other strides, 0 included), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def on_device(x: Tensor):
    """A context that launches on x's GPU, not whichever is current (Triton and CUDA launch on the
    current device); nothing for a CPU tensor."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


class TemperatureArg(NamedTuple):
    """A temperature as kernels take it: ``tensor`` of one value or one per row (None for a float),
    ``inverse`` 1/T for a float (1.0 when a tensor is given), ``stride`` between rows' values (0 for one)."""

    tensor: Tensor | None
    inverse: float
    stride: int


def temperature_arg(temperature: float | Tensor) -> TemperatureArg:
    if isinstance(temperature, Tensor):
        return TemperatureArg(temperature, 1.0, temperature.stride(0) if temperature.dim() else 0)
    return TemperatureArg(None, 1.0 / temperature, 0)


class KDOutputs(NamedTuple):
    """What the loss's forward writes, and how it scales.

    ``rows`` (N,) each row's loss times the reduction's scale (float32; float64 for float64 logits);
    ``grad`` (N, V) dL/dx in the student's dtype (the student itself with ``inplace_grad``; no rows
    without ``need_grad``); the reduction's scale as ``scale_tensor``, a 0-d tensor of ``rows``' dtype (1 / rows
    not ignored, for "mean" with a target: no host sync) or None, else as the float ``scale``;
    ``scale_grad``: whether the forward applies it to the gradient; ``later``: the scale left to the
    backward (a 0-d tensor), or None. A float16 gradient is stored unscaled: scaled by 1/rows first,
    its small entries would round to 0 before a GradScaler's factor reaches them. ``parts`` (2, N), in
    ``rows``' dtype, with ``return_parts``: each row's KD part c D and CE part, times the scale (the
    backend writes both terms, each whatever its weight); (0, N) without.
    """

    rows: Tensor
    grad: Tensor
    scale_tensor: Tensor | None
    scale: float
    scale_grad: bool
    later: Tensor | None
    parts: Tensor


def kd_outputs(student: Tensor, target: Tensor | None, options: KDOptions, inplace_grad: bool,
               need_grad: bool) -> KDOutputs:  # fmt: skip
    """The outputs of the loss's forward over ``student`` (N, V) (unit column stride when
    ``inplace_grad``), allocated here for every backend."""
    n_rows, n_cols = student.shape
    compute = torch.float64 if student.dtype == torch.float64 else torch.float32
    rows = torch.empty(n_rows, dtype=compute, device=student.device)
    if not need_grad:
        grad = student.new_empty((0, n_cols))
    elif inplace_grad:
        grad = student
    else:
        grad = _memory.empty((n_rows, n_cols), student.dtype, student.device)
    parts = torch.empty((2 if options.return_parts else 0, n_rows), dtype=compute, device=student.device)
    scale_tensor, scale = None, 1.0
    if isinstance(options.normalizer, Tensor):  # a count from the caller replaces the reduction's divisor
        scale_tensor = 1.0 / options.normalizer.to(compute)
    elif options.normalizer is not None:
        scale = 1.0 / options.normalizer
    elif options.reduction == "mean" and target is not None:
        scale_tensor = 1.0 / (target != options.ignore_index).sum().clamp_min(1).to(compute)
    elif options.reduction in ("mean", "batchmean"):
        scale = 1.0 / max(n_rows, 1)
    scale_grad = student.dtype != torch.float16 or (scale_tensor is None and scale == 1.0)
    later = None
    if not scale_grad:
        later = scale_tensor if scale_tensor is not None else torch.full((), scale, device=student.device)
    return KDOutputs(rows, grad, scale_tensor, scale, scale_grad, later, parts)
