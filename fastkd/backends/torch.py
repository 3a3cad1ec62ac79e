"""The PyTorch backend: the contract of ``fastkd.backends`` in plain PyTorch, on any device and dtype.

The math runs in the compute dtype (float32; float64 for float64 inputs), in closed form, with no
autograd inside (a ``torch.library`` op's body, where ``torch.compile`` reaches a backend, runs below
autograd): the loss's rows and gradient from ``fastkd.backends.torch_kd``, the softmax's backward from
its formulas (``kernels/softmax.py``'s module doc), the calibration and fidelity passes from the
reference's row functions a chunk of rows at a time (at most ``CHUNK_ELEMENTS`` entries, so that its
float32 temporaries stay bounded).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastkd import reference
from fastkd._host import KDOutputs
from fastkd._options import KDOptions
from fastkd.backends.torch_kd import RowLosses, dense_rows, topk_rows

NAME = "torch"
CHUNK_ELEMENTS = 1 << 24  # rows x classes per step of the calibration and fidelity passes (64 MiB of float32)
# Bytes per logit entry that the loss's float32 intermediates take beyond the inputs (a few (C, V)
# temporaries of the closed form).
WORKSPACE_BYTES_PER_ENTRY = 52


def _per_row(temperature: float | Tensor, x: Tensor) -> float | Tensor:
    """1/T broadcastable against rows x (N, V): a float, or a (N, 1) / 0-d tensor in x's dtype."""
    if not isinstance(temperature, Tensor):
        return 1.0 / temperature
    t = temperature.to(x.dtype)
    return 1 / (t[:, None] if t.dim() else t)


def tempered_softmax_forward(x: Tensor, temperature: float | Tensor, log: bool, y: Tensor, stats: Tensor) -> None:
    u = reference.scale_logits(x, temperature, -1)
    log_d = torch.logsumexp(u, -1, keepdim=True)
    y.copy_(u - log_d if log else (u - log_d).exp())
    if stats.shape[0] == x.shape[0] and x.shape[1]:
        stats[:, 0] = x.amax(-1)
        stats[:, 1] = log_d.squeeze(-1)


def tempered_softmax_backward(grad: Tensor, saved: Tensor, temperature: float | Tensor, stats: Tensor, log: bool,
                              dx: Tensor | None, dt: Tensor | None) -> None:  # fmt: skip
    dtype = reference.compute_dtype(saved.dtype)
    g = grad.to(dtype)
    if dt is not None:  # saved: the logits; p and u recomputed from them
        u = reference.scale_logits(saved, temperature, -1)
        p = torch.softmax(u, -1)
    else:  # saved: the output
        p = saved.to(dtype).exp() if log else saved.to(dtype)
    du = g - p * g.sum(-1, keepdim=True) if log else p * (g - (g * p).sum(-1, keepdim=True))
    inv_t = _per_row(temperature, p)
    if dx is not None:
        dx.copy_(du * inv_t)
    if dt is not None:  # -(1/T) sum_j u_j dL/du_j over the logits that are not -inf (constants of T)
        masked = torch.isneginf(saved)
        terms = torch.where(masked, 0.0, u * du).sum(-1, keepdim=True)
        value = torch.where(masked.all(-1, keepdim=True), torch.nan, -inv_t * terms)  # no distribution: NaN
        dt.copy_(value.reshape(-1) if saved.shape[1] else 0.0)


def _finish(rows: RowLosses, grad: Tensor | None, out: KDOutputs) -> None:
    """Write the row losses (and their parts) and dL/dx of the summed rows into ``out``, scaled as it says."""
    scale = out.scale if out.scale_tensor is None else out.scale_tensor
    out.rows.copy_(rows.total * scale)
    if out.parts.shape[0]:
        out.parts.copy_(torch.stack([rows.kd, rows.ce]) * scale)
    if grad is not None and out.grad.shape[0]:
        out.grad.copy_(grad * scale if out.scale_grad else grad)


def kd_loss_forward(student: Tensor, teacher: Tensor, target: Tensor | None, options: KDOptions,
                    out: KDOutputs) -> None:  # fmt: skip
    dtype = reference.compute_dtype(student.dtype)
    rows, grad, _ = dense_rows(student.to(dtype), teacher.to(dtype), target, options, out.grad.shape[0] > 0)
    _finish(rows, grad, out)


def kd_loss_topk_forward(student: Tensor, indices: Tensor, values: Tensor, target: Tensor | None,
                         options: KDOptions, out: KDOutputs) -> None:  # fmt: skip
    rows, grad = topk_rows(student.to(reference.compute_dtype(student.dtype)), indices, values, target, options,
                           out.grad.shape[0] > 0)  # fmt: skip
    _finish(rows, grad, out)


def scale_grad_(grad: Tensor, grad_output: Tensor) -> None:
    if grad_output.dim():
        grad.mul_(grad_output[:, None])
    elif bool(grad_output != 1):
        grad.mul_(grad_output)


def _chunks(n_rows: int, n_cols: int):
    """(start, stop) of row chunks of at most ``CHUNK_ELEMENTS`` entries."""
    step = max(1, CHUNK_ELEMENTS // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield start, min(start + step, n_rows)


def _rows(temperature: float | Tensor, start: int, stop: int) -> float | Tensor:
    return temperature[start:stop] if isinstance(temperature, Tensor) and temperature.dim() else temperature


def calibration_pass(logits: Tensor, target: Tensor, mode: str, temperature: float | Tensor, probs: bool,
                     ignore_index: int, n_bins: int) -> dict[str, Tensor]:  # fmt: skip
    n_rows, n_cols = logits.shape
    device = logits.device
    zero = torch.zeros((), dtype=torch.float64, device=device)
    if mode == "newton":
        sums = [zero.clone(), zero.clone(), zero.clone()]
        for start, stop in _chunks(n_rows, n_cols):
            x = logits[start:stop]
            if probs:
                x = reference.probs_as_logits(x)
            u = 1.0 / temperature
            for total, part in zip(sums, reference.temperature_nll_derivatives(x, target[start:stop], u, ignore_index)):
                total += part
        return dict(zip(("nll", "grad", "hess"), sums))
    result = {"nll": zero.clone(), "brier": zero.clone()}
    if mode == "bins":
        result |= {
            "bin_count": torch.zeros(n_bins, dtype=torch.int64, device=device),
            "bin_correct": torch.zeros(n_bins, dtype=torch.int64, device=device),
            "bin_confidence_sum": torch.zeros(n_bins, dtype=torch.float64, device=device),
        }
    else:
        result |= {
            "confidence": torch.full((n_rows,), float("nan"), dtype=torch.float32, device=device),
            "correct": torch.full((n_rows,), -1, dtype=torch.int8, device=device),
        }
    for start, stop in _chunks(n_rows, n_cols):
        x, y, t = logits[start:stop], target[start:stop], _rows(temperature, start, stop)
        valid = y != ignore_index
        if isinstance(t, Tensor) and t.dim():
            t = t[valid]
        confidence, correct, nll, brier = reference.top_label_rows(x[valid], y[valid], t, probs)
        result["nll"] += nll.double().sum()
        result["brier"] += brier.double().sum()
        if mode == "bins":
            sums = reference.binned_sums(reference.confidence_bins(confidence, n_bins), correct, confidence, n_bins)
            for name, part in zip(("bin_count", "bin_correct", "bin_confidence_sum"), sums):
                result[name] += part
        else:
            index = valid.nonzero().squeeze(1) + start
            result["confidence"][index] = confidence.float()
            result["correct"][index] = correct.to(torch.int8)
    return result


def fidelity_pass(student: Tensor, teacher: Tensor, temperature: float | Tensor) -> tuple[Tensor, Tensor]:
    n_rows, n_cols = student.shape
    agree = torch.zeros((), dtype=torch.int64, device=student.device)
    kl = torch.zeros((), dtype=torch.float64, device=student.device)
    for start, stop in _chunks(n_rows, n_cols * (teacher.shape[0] + 1)):
        same, rows = reference.fidelity_rows(student[start:stop], teacher[:, start:stop],
                                             _rows(temperature, start, stop))  # fmt: skip
        agree += same.sum()
        kl += rows.double().sum()
    return agree, kl
