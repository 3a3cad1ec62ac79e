"""Drop-ins for the distillation losses of TRL, Liger-Kernel and torchtune: each peer's call shape and
exact semantics (read from its source), computed by fastkd's fused loss. Change the import, keep the
call. Where a peer's result cannot be reproduced by a fused kernel (an element-wise result), the
drop-in raises and says what to call instead.

  TRL         ``generalized_jsd_loss``          (trl/experimental/gkd/gkd_trainer.py)
  Liger       ``LigerFusedLinearJSDLoss``       (liger_kernel/chunked_loss/jsd_loss.py)
              ``LigerFusedLinearKLDivLoss``     (liger_kernel/transformers/fused_linear_kl_div.py)
  torchtune   ``ForwardKLLoss``, ``ForwardKLWithChunkedOutputLoss``   (torchtune/modules/loss/kd_losses.py)

All return float32 losses (float64 for float64 inputs), where the peers return the logits' dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastkd.fused_linear import fused_linear_kd_loss
from fastkd.kd_loss import kd_loss

IGNORE_INDEX = -100


def _jsd_divergence(beta: float) -> dict:
    """The peers' generalized JSD: beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta)
    p_s, whose ends they define as forward KL (beta = 0, KL(p_t || p_s)) and reverse KL (beta = 1)."""
    if beta == 0:
        return dict(divergence="forward_kl")
    if beta == 1:
        return dict(divergence="reverse_kl")
    return dict(divergence="jsd", beta=beta)


def generalized_jsd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None,
                         beta: float = 0.5, temperature: float = 1.0, reduction: str = "batchmean",
                         num_items_in_batch: int | Tensor | None = None) -> Tensor:  # fmt: skip
    """TRL's ``GKDTrainer.generalized_jsd_loss``: the generalized JSD of softmax(z / T) (no T^2), summed
    over the vocabulary and over the tokens whose label is not -100 (every token without labels), then

        num_items_in_batch given   / num_items_in_batch
        "batchmean"                / the tokens counted (at least 1); without labels / the logits' size(0)
                                   (the batch B of (B, S, V) logits)
        "sum"                      / 1
        "mean"                     / (the tokens counted x V): TRL's mean over the element-wise terms

    ``reduction="none"`` (TRL: the element-wise (tokens, V) terms) is refused: the fused loss has per-token
    rows, ``fastkd.kd_loss(..., reduction="none")``.
    """
    if reduction == "none":
        raise ValueError("reduction='none' gives TRL's element-wise (tokens x vocabulary) terms, which a fused loss "
                         "does not form: use fastkd.kd_loss(..., reduction='none') for per-token losses")  # fmt: skip
    if reduction not in ("batchmean", "sum", "mean"):
        raise ValueError(f"reduction must be one of 'batchmean', 'sum', 'mean', 'none'; got {reduction!r}")
    options = dict(_jsd_divergence(beta), temperature=temperature, temperature_squared=False, alpha=1.0)
    counted = (labels != IGNORE_INDEX).sum() if labels is not None else student_logits.shape[:-1].numel()
    if num_items_in_batch is not None:
        normalizer = num_items_in_batch
    elif reduction == "batchmean":
        normalizer = counted.clamp_min(1) if labels is not None else max(student_logits.shape[0], 1)
    elif reduction == "mean":
        normalizer = counted * student_logits.shape[-1]
    else:
        normalizer = None
    return kd_loss(student_logits, teacher_logits, labels, reduction="sum", normalizer=normalizer, **options)


class LigerFusedLinearJSDLoss(nn.Module):
    """Liger-Kernel's ``LigerFusedLinearJSDLoss``: the student's and teacher's final layers fused with

        loss = weight_hard_loss CE + weight_soft_loss JSD_beta(softmax(z_s / T), softmax(z_t / T))

    each term summed over the tokens whose label is not ``ignore_index`` and divided by their count
    (JSD without T^2; beta 0 and 1 forward and reverse KL; the CE at T = 1). ``forward(student_input,
    student_weight, teacher_input, teacher_weight, true_labels, student_bias=None, teacher_bias=None)``
    returns the loss, or (loss, soft_loss, hard_loss) with ``return_soft_hard_loss``. ``chunk_size``
    is the rows of fastkd's chunks; ``compiled`` is accepted and unused (no ``torch.compile`` here).
    A teacher vocabulary wider than the student's, which Liger pads with zero logits, is refused.
    """

    def __init__(self, weight_hard_loss: float = 0.5, weight_soft_loss: float = 0.5, beta: float = 0.5,
                 ignore_index: int = IGNORE_INDEX, temperature: float = 1.0, compiled: bool = True,
                 chunk_size: int = 1024, return_soft_hard_loss: bool = False):  # fmt: skip
        super().__init__()
        self.weight_hard_loss, self.weight_soft_loss = float(weight_hard_loss), float(weight_soft_loss)
        self.beta, self.ignore_index, self.temperature = beta, ignore_index, temperature
        self.compiled, self.chunk_size, self.return_soft_hard_loss = compiled, chunk_size, return_soft_hard_loss
        self._options()  # checked now, as a constructor should

    def _options(self) -> dict:
        total = self.weight_hard_loss + self.weight_soft_loss
        alpha = self.weight_soft_loss / total if total else 0.5
        return dict(_jsd_divergence(self.beta), alpha=alpha, temperature=self.temperature, temperature_squared=False,
                    ignore_index=self.ignore_index, chunk_size=self.chunk_size, return_parts=True)  # fmt: skip

    def forward(self, student_input: Tensor, student_weight: Tensor, teacher_input: Tensor, teacher_weight: Tensor,
                true_labels: Tensor, student_bias: Tensor | None = None,
                teacher_bias: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        total, soft, hard = fused_linear_kd_loss(
            student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias=student_bias,
            teacher_bias=teacher_bias, **self._options(),
        )  # fmt: skip
        loss = (self.weight_hard_loss + self.weight_soft_loss) * total
        return (loss, soft, hard) if self.return_soft_hard_loss else loss


class LigerFusedLinearKLDivLoss(nn.Module):
    """Liger-Kernel's ``LigerFusedLinearKLDivLoss``: the student's final layer fused with KL(target ||
    softmax(z_s / T)) against a teacher given as probabilities ``target`` (BT, V) (cached soft labels),
    no T^2, rows whose ``shift_labels`` is ``ignore_index`` left out; reduced as ``nn.KLDivLoss``:
    "batchmean" / the rows counted, "mean" / (the rows counted x V), "sum". A class of probability 0
    adds 0 (Liger clamps at ``eps`` before the log: its rows below ``eps`` differ by at most
    V eps |log eps|). ``forward(student_input, student_weight, target, shift_labels=None)``.
    """

    def __init__(self, reduction: str = "batchmean", ignore_index: int = IGNORE_INDEX, temperature: float = 1.0,
                 eps: float = 1e-10, accum_dtype: torch.dtype | None = None):  # fmt: skip
        super().__init__()
        if reduction not in ("batchmean", "mean", "sum"):
            raise ValueError(f"reduction must be one of 'batchmean', 'mean', 'sum' (Liger refuses 'none'); got "
                             f"{reduction!r}")  # fmt: skip
        self.reduction, self.ignore_index, self.temperature, self.eps = reduction, ignore_index, temperature, eps
        self.accum_dtype = accum_dtype  # fastkd accumulates a half-precision weight's gradient in float32 anyway

    def forward(self, student_input: Tensor, student_weight: Tensor, target: Tensor,
                shift_labels: Tensor | None = None) -> Tensor:  # fmt: skip
        counted = (shift_labels != self.ignore_index).sum() if shift_labels is not None else student_input.shape[0]
        normalizer = None
        if self.reduction == "batchmean":
            normalizer = counted
        elif self.reduction == "mean":
            normalizer = counted * student_weight.shape[0]
        if isinstance(normalizer, Tensor) and not bool(normalizer):  # no counted row: Liger's loss is 0
            normalizer = None
        return fused_linear_kd_loss(
            student_input, student_weight, target=shift_labels, teacher_logits=target.log(), alpha=1.0,
            temperature=self.temperature, teacher_temperature=1.0, temperature_squared=False,
            ignore_index=self.ignore_index, reduction="sum", normalizer=normalizer,
        )  # fmt: skip


def _teacher_entropy(teacher_logits: Tensor, mask: Tensor, chunk_rows: int = 4096) -> Tensor:
    """sum over the counted rows of H(p_t) = -sum_j p_j log p_j, p_t = softmax(teacher_logits) in float32
    (float64 for float64), a chunk of rows at a time; no gradient."""
    rows = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    mask = mask.reshape(-1)
    dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    total = torch.zeros((), dtype=dtype, device=rows.device)
    for start in range(0, rows.shape[0], chunk_rows):
        log_p = torch.log_softmax(rows[start : start + chunk_rows].to(dtype), -1)
        entropy = -torch.where(log_p > -torch.inf, log_p.exp() * log_p, 0.0).sum(-1)
        total += torch.where(mask[start : start + chunk_rows], entropy, 0.0).sum()
    return total


class ForwardKLLoss(nn.Module):
    """torchtune's ``ForwardKLLoss``: -sum_j p_t,j log p_s,j per token (the cross-entropy to the teacher's
    softmax, at T = 1: KL(p_t || p_s) plus the teacher's entropy, which has no gradient), summed over the
    tokens whose label is not ``ignore_index``, divided by their count (``normalize``; 0 when none).
    ``forward(student_logits, teacher_logits, labels, normalize=True)``. torchtune zeroes the term of a
    class whose student logit is +-inf; fastkd keeps the math (a teacher mass on a -inf student class is
    an infinite loss).
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, normalize: bool = True) -> Tensor:
        return _forward_kl_sum(student_logits, teacher_logits, labels, self.ignore_index) / (
            _count(labels, self.ignore_index) if normalize else 1
        )


def _count(labels: Tensor, ignore_index: int) -> Tensor:
    """The tokens counted (at least 1: torchtune's 0 / 0 returns 0)."""
    return (labels != ignore_index).sum().clamp_min(1)


def _forward_kl_sum(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """sum over the counted tokens of -sum_j p_t,j log p_s,j (``ForwardKLLoss``)."""
    student = student_logits.reshape(-1, student_logits.shape[-1])
    teacher = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    labels = labels.reshape(-1)
    kl = kd_loss(student, teacher, labels, alpha=1.0, temperature_squared=False, ignore_index=ignore_index,
                 reduction="sum")  # fmt: skip
    return kl + _teacher_entropy(teacher, labels != ignore_index)


class ForwardKLWithChunkedOutputLoss(nn.Module):
    """torchtune's ``ForwardKLWithChunkedOutputLoss``: ``ForwardKLLoss`` over logits given as lists of
    chunks along the sequence, [(B, S_c, V)] each, with labels (B, S) split the same way; summed over
    the chunks and divided by the tokens counted over all of them."""

    def __init__(self, num_output_chunks: int = 8, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.num_output_chunks, self.ignore_index = num_output_chunks, ignore_index

    def forward(self, student_logits: list[Tensor], teacher_logits: list[Tensor], labels: Tensor) -> Tensor:
        widths = [chunk.shape[1] for chunk in student_logits]
        total = sum(_forward_kl_sum(s, t, y, self.ignore_index)
                    for s, t, y in zip(student_logits, teacher_logits, labels.split(widths, dim=1)))  # fmt: skip
        return total / _count(labels, self.ignore_index)
