"""The CUDA C++ backend (experimental: compiled, not yet validated on a GPU): the contract of
``fastkd.backends`` over the ops of csrc/cuda/ (``torch.ops.fastkd_cuda.*``, built by ``fastkd._cuda_ext``).

What runs in the CUDA kernels (CUDA tensors of float16, bfloat16, float32; math in float32):

- ``kd_loss_forward``: forward KL, reverse KL, JSD, skew KL, skew reverse KL, TVD and the alpha-beta
  divergence against one teacher, CE with label smoothing,
  temperatures (a float, or a tensor of one value or one per row), ignore_index, T^2, the reduction's
  scale, the loss's parts. Rows of at most 16384 in one block, up to 16 x 16384 in a thread-block
  cluster on sm_90+, wider rows (or GPUs without clusters) in a multi-pass kernel (csrc/cuda/kd_loss.cu).
- ``calibration_pass`` in the ``"bins"`` and ``"rows"`` modes over logits: the per-row values in one
  kernel, their float64 sums and the bins' counts as torch ops on the device (``index_add_``: the
  float64 bin sums' order, and so their last bits, may vary between runs).

Delegated, explicitly, to the Triton backend (the PyTorch backend where triton is not installed):
everything else: ``logit_norm``, ensembles of more than one teacher, DKD, ``softcap``, float64, the sparse teacher's loss (``kd_loss_topk_forward``), the tempered softmax,
``scale_grad_``, the calibration pass's Newton mode and probability inputs, ``fidelity_pass``.
"""

from __future__ import annotations

import importlib
import os

import torch
from torch import Tensor

from fastkd import _cuda_ext
from fastkd._backend import KERNEL_DTYPES, TRITON_AVAILABLE
from fastkd._host import KDOutputs
from fastkd._options import KDOptions
from fastkd.backends import kernels_cover

NAME = "cuda"
WORKSPACE_BYTES_PER_ENTRY = 0  # the kernels write the gradient in place (over the student's row when asked)

DIVERGENCES = {
    "forward_kl": 0,
    "reverse_kl": 1,
    "jsd": 2,
    "skew_kl": 3,
    "skew_reverse_kl": 4,
    "tvd": 5,
    "ab": 6,
}
PATHS = {"auto": 0, "one_block": 1, "cluster": 2, "multi_pass": 3}  # csrc/cuda/launch.h KDPath

if not _cuda_ext.load():
    raise ImportError(f"fastkd.backends.cuda: the CUDA extension did not load: {_cuda_ext.error()}")
_ops = torch.ops.fastkd_cuda

# What the CUDA kernels do not cover runs here: Triton where installed, else PyTorch.
fallback = importlib.import_module("fastkd.backends.triton" if TRITON_AVAILABLE else "fastkd.backends.torch")


def _split(temperature: float | Tensor) -> tuple[Tensor | None, float]:
    return (temperature, 1.0) if isinstance(temperature, Tensor) else (None, float(temperature))


def in_kernel(student: Tensor, teacher: Tensor, options: KDOptions) -> bool:
    """Whether the CUDA kernels run this loss (else ``fallback`` does)."""
    return (
        student.is_cuda
        and student.dtype in KERNEL_DTYPES
        and teacher.shape[0] == 1
        and kernels_cover(options, DIVERGENCES)  # not DKD, not softcap
        and options.logit_norm is None
    )


def kd_loss_forward(student: Tensor, teacher: Tensor, target: Tensor | None, options: KDOptions,
                    out: KDOutputs) -> None:  # fmt: skip
    """The contract's op. ``FASTKD_CUDA_PATH`` (one_block, cluster, multi_pass) forces a kernel: the GPU
    tests run every path on small rows that way."""
    path = os.environ.get("FASTKD_CUDA_PATH", "auto")
    if path not in PATHS:
        raise ValueError(f"FASTKD_CUDA_PATH must be one of {', '.join(PATHS)}; got {path!r}")
    if not in_kernel(student, teacher, options):
        return fallback.kd_loss_forward(student, teacher, target, options, out)
    _ops.kd_loss_fwd(
        student, teacher, target, *_split(options.temperature), *_split(options.teacher_temperature),
        out.scale_tensor, out.scale, out.scale_grad, options.alpha, options.beta, options.skew, options.ab_alpha,
        options.ab_beta, options.dkd_alpha, options.dkd_beta, 0.0, options.label_smoothing, options.norm_scale,
        options.ignore_index, DIVERGENCES[options.divergence], 0, options.temperature_squared, options.return_parts,
        out.rows, out.grad, out.parts, PATHS[path],
    )  # fmt: skip


def kd_loss_topk_forward(student: Tensor, indices: Tensor, values: Tensor, target: Tensor | None,
                         options: KDOptions, out: KDOutputs) -> None:  # fmt: skip
    return fallback.kd_loss_topk_forward(student, indices, values, target, options, out)


def tempered_softmax_forward(
    x: Tensor, temperature: float | Tensor, log: bool, y: Tensor, stats: Tensor
) -> None:
    return fallback.tempered_softmax_forward(x, temperature, log, y, stats)


def tempered_softmax_backward(grad: Tensor, saved: Tensor, temperature: float | Tensor, stats: Tensor, log: bool,
                              dx: Tensor | None, dt: Tensor | None) -> None:  # fmt: skip
    return fallback.tempered_softmax_backward(grad, saved, temperature, stats, log, dx, dt)


def scale_grad_(grad: Tensor, grad_output: Tensor) -> None:
    return fallback.scale_grad_(grad, grad_output)


def fidelity_pass(student: Tensor, teacher: Tensor, temperature: float | Tensor) -> tuple[Tensor, Tensor]:
    return fallback.fidelity_pass(student, teacher, temperature)


def calibration_pass(logits: Tensor, target: Tensor, mode: str, temperature: float | Tensor, probs: bool,
                     ignore_index: int, n_bins: int) -> dict[str, Tensor]:  # fmt: skip
    if mode not in ("bins", "rows") or probs or logits.dtype not in KERNEL_DTYPES or logits.shape[1] == 0:
        return fallback.calibration_pass(logits, target, mode, temperature, probs, ignore_index, n_bins)
    n_rows, device = logits.shape[0], logits.device
    nll = torch.empty(n_rows, dtype=torch.float32, device=device)
    brier, conf = torch.empty_like(nll), torch.empty_like(nll)
    ok = torch.empty(n_rows, dtype=torch.int8, device=device)
    bins = torch.empty(n_rows, dtype=torch.int32, device=device)
    _ops.calibration_rows(
        logits, target, *_split(temperature), ignore_index, n_bins, nll, brier, conf, ok, bins
    )
    live = ok >= 0
    zero = torch.zeros((), dtype=torch.float64, device=device)
    result = {
        "nll": torch.where(live, nll.double(), zero).sum(),
        "brier": torch.where(live, brier.double(), zero).sum(),
    }
    if mode == "rows":
        return result | {"confidence": conf, "correct": ok}
    index = bins.long().clamp_min(0)
    counts = torch.zeros(n_bins, dtype=torch.int64, device=device)
    return result | {
        "bin_count": counts.index_add(0, index, live.long()),
        "bin_correct": counts.index_add(0, index, (ok == 1).long()),
        "bin_confidence_sum": torch.zeros(n_bins, dtype=torch.float64, device=device).index_add(
            0, index, torch.where(live, conf.double(), zero)
        ),
    }
