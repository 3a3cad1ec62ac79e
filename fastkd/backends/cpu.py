"""The C++ CPU backend: the contract of ``fastkd.backends`` over the ops of the extension in csrc/
(``torch.ops.fastkd_cpu.*``, loaded or built by ``fastkd._ext``).

CPU tensors of float16, bfloat16, float32 and float64; math in float32 (float64 for float64). Each
function turns its arguments into the op's (a temperature as an optional tensor and a float, option
names as the kernels' integers) and passes the outputs the caller allocated, which the op writes in
place. Rows run in parallel (``at::parallel_for``), each row's inner loops in SIMD (``at::vec``); the
exps per entry of each op are in their file's header comment and in benchmarks/README.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastkd import _ext
from fastkd._host import KDOutputs
from fastkd._options import KDOptions
from fastkd.backends import kernels_cover
from fastkd.backends import torch as torch_backend

NAME = "cpu"
WORKSPACE_BYTES_PER_ENTRY = 0  # per-thread row buffers only: nothing per logit entry beyond the gradient

DIVERGENCES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "skew_kl": 3, "skew_reverse_kl": 4, "tvd": 5, "ab": 6, "dkd": 7}
TOPK_DIVERGENCES = tuple(d for d in DIVERGENCES if d != "dkd")  # the sparse teacher's kernel (DKD: dense only)
NORMS = {None: 0, "standardize": 1, "spherical": 2}
MODES = {"bins": 0, "rows": 1, "newton": 2}

if not _ext.load():
    raise ImportError(f"fastkd.backends.cpu: the C++ extension did not load: {_ext.error()}")
_ops = torch.ops.fastkd_cpu


def _split(temperature: float | Tensor) -> tuple[Tensor | None, float]:
    return (temperature, 1.0) if isinstance(temperature, Tensor) else (None, float(temperature))


def tempered_softmax_forward(x: Tensor, temperature: float | Tensor, log: bool, y: Tensor, stats: Tensor) -> None:
    _ops.softmax_fwd(x, *_split(temperature), log, y, stats)


def tempered_softmax_backward(grad: Tensor, saved: Tensor, temperature: float | Tensor, stats: Tensor, log: bool,
                              dx: Tensor | None, dt: Tensor | None) -> None:  # fmt: skip
    if grad.dtype != saved.dtype:
        grad = grad.to(saved.dtype)
    empty = saved.new_empty(0)
    _ops.softmax_bwd(grad, saved, *_split(temperature), stats, log, empty if dx is None else dx,
                     empty.float() if dt is None else dt, dx is not None, dt is not None)  # fmt: skip


def kd_loss_forward(student: Tensor, teacher: Tensor, target: Tensor | None, options: KDOptions,
                    out: KDOutputs) -> None:  # fmt: skip
    if not kernels_cover(options, DIVERGENCES, softcap=True):
        return torch_backend.kd_loss_forward(student, teacher, target, options, out)
    _ops.kd_loss_fwd(
        student, teacher, target, *_split(options.temperature), *_split(options.teacher_temperature),
        out.scale_tensor, out.scale, out.scale_grad, options.alpha, options.beta, options.skew,
        options.ab_alpha, options.ab_beta, options.dkd_alpha, options.dkd_beta, options.softcap or 0.0,
        options.label_smoothing, options.norm_scale, options.ignore_index, DIVERGENCES[options.divergence],
        NORMS[options.logit_norm], options.temperature_squared, options.return_parts, out.rows, out.grad, out.parts,
    )  # fmt: skip


def kd_loss_topk_forward(student: Tensor, indices: Tensor, values: Tensor, target: Tensor | None,
                         options: KDOptions, out: KDOutputs) -> None:  # fmt: skip
    if not kernels_cover(options, TOPK_DIVERGENCES, softcap=True):
        return torch_backend.kd_loss_topk_forward(student, indices, values, target, options, out)
    _ops.kd_loss_topk_fwd(
        student, indices, values, target, *_split(options.temperature), *_split(options.teacher_temperature),
        out.scale_tensor, out.scale, out.scale_grad, options.alpha, options.beta, options.skew, options.ab_alpha,
        options.ab_beta, options.softcap or 0.0, options.label_smoothing, options.ignore_index,
        DIVERGENCES[options.divergence], options.tail == "bucket", options.temperature_squared, options.return_parts,
        out.rows, out.grad, out.parts,
    )  # fmt: skip


def scale_grad_(grad: Tensor, grad_output: Tensor) -> None:
    _ops.scale_grad_(grad, grad_output)


def calibration_pass(logits: Tensor, target: Tensor, mode: str, temperature: float | Tensor, probs: bool,
                     ignore_index: int, n_bins: int) -> dict[str, Tensor]:  # fmt: skip
    n_rows = logits.shape[0]
    tempered = isinstance(temperature, Tensor) or temperature != 1
    log_input = probs and (mode == "newton" or tempered)  # probabilities read as logits log p
    sums = torch.empty(3, dtype=torch.float64)
    bins = n_bins if mode == "bins" else 0
    bin_count = torch.empty(bins, dtype=torch.int64)
    bin_correct = torch.empty(bins, dtype=torch.int64)
    bin_conf = torch.empty(bins, dtype=torch.float64)
    rows = n_rows if mode == "rows" else 0
    confidence = torch.empty(rows, dtype=torch.float32)
    correct = torch.empty(rows, dtype=torch.int8)
    _ops.calibration(logits, target, MODES[mode], *_split(temperature), probs and not log_input, log_input,
                     ignore_index, n_bins, sums, bin_count, bin_correct, bin_conf, confidence, correct)  # fmt: skip
    if mode == "newton":
        return {"nll": sums[0], "grad": sums[1], "hess": sums[2]}
    result = {"nll": sums[0], "brier": sums[1]}
    if mode == "rows":
        return result | {"confidence": confidence, "correct": correct}
    return result | {"bin_count": bin_count, "bin_correct": bin_correct, "bin_confidence_sum": bin_conf}


def fidelity_pass(student: Tensor, teacher: Tensor, temperature: float | Tensor) -> tuple[Tensor, Tensor]:
    agree = torch.zeros((), dtype=torch.int64)
    kl = torch.zeros((), dtype=torch.float64)
    _ops.fidelity(student, teacher, *_split(temperature), agree, kl)
    return agree, kl
