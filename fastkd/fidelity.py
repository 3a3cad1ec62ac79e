"""Student-teacher fidelity (Stanton et al., "Does Knowledge Distillation Really Work?", 2021): how
closely a student's predictions match its teacher's, as opposed to how accurate either is.

    top-1 agreement  = mean_i [argmax_j s_ij = argmax_j p_ij]
    predictive KL    = mean_i KL(p_i || q_i),   q = softmax(s / T),  p = mean_k softmax(t_k / T)

for student logits s and teacher logits t (an ensemble of K teachers averages their tempered
softmaxes; its top-1 class is the argmax of p, a single teacher's that of its logits). The Triton
kernel reads both rows once (an ensemble's members twice: their log-sum-exps come first).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fastkd import reference
from fastkd._backend import resolve_backend
from fastkd._validate import check_choice, check_logits, check_probs, check_teacher, check_temperature, should_check_values
from fastkd.calibration import CHUNK_ELEMENTS, INPUTS


class Fidelity(NamedTuple):
    top1_agreement: float
    predictive_kl: float
    count: int  # rows compared


def fidelity(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float | Tensor = 1.0,
    *,
    input: str = "logits",
    backend: str = "auto",
    validate_args: bool = True,
) -> Fidelity:
    """Top-1 agreement and predictive KL(p_teacher || p_student) at ``temperature``, in one pass.

    Args:
        student_logits: (N, C) or (B, S, C), float16/bfloat16/float32/float64.
        teacher_logits: the student's shape, or (K,) + it for an ensemble of K teachers.
        temperature: T > 0, a float or a tensor of one value or one per row.
        input: ``"logits"``, or ``"probs"`` when both hold probabilities (tempered as softmax(log p / T)).
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see ``fastkd._backend``).
        validate_args: check tensor temperatures and probabilities (a host sync on CUDA).

    Returns ``Fidelity(top1_agreement, predictive_kl, count)``; NaN means with no rows. The KL is
    infinite where the teacher gives mass to a class the student masks with -inf.
    """
    check_logits(student_logits, "student_logits")
    if student_logits.shape[-1] == 0:
        raise ValueError("student_logits must have at least one class (the last dimension is 0)")
    n_teachers = check_teacher(teacher_logits, student_logits)
    check_choice(input, INPUTS, "input")
    check_values = should_check_values(validate_args)
    temperature = check_temperature(temperature, student_logits, student_logits.dim() - 1, check_values=check_values)
    if isinstance(temperature, Tensor):
        temperature = temperature.detach().reshape(-1) if temperature.dim() else temperature.detach()
    backend = resolve_backend(backend, student_logits)
    n_classes = student_logits.shape[-1]
    student = student_logits.detach().reshape(-1, n_classes)
    teacher = teacher_logits.detach().reshape(n_teachers, -1, n_classes)
    if input == "probs":
        check_probs(student, "student_logits", check_values=check_values)
        check_probs(teacher, "teacher_logits", check_values=check_values)
        student, teacher = (x.to(torch.promote_types(x.dtype, torch.float32)).log() for x in (student, teacher))
    n_rows = student.shape[0]
    if backend == "triton":
        from fastkd.kernels.fidelity import fidelity_pass

        agree, kl = fidelity_pass(student, teacher, temperature)
        agree, kl = int(agree), float(kl)
    else:
        agree, kl = 0, 0.0
        step = max(1, CHUNK_ELEMENTS // (n_classes * (n_teachers + 1)))
        for start in range(0, n_rows, step):
            t = temperature[start : start + step] if isinstance(temperature, Tensor) and temperature.dim() else temperature
            same, row_kl = reference.fidelity_rows(student[start : start + step], teacher[:, start : start + step], t)
            agree += int(same.sum())
            kl += float(row_kl.double().sum())
    if n_rows == 0:
        return Fidelity(float("nan"), float("nan"), 0)
    return Fidelity(agree / n_rows, kl / n_rows, n_rows)
