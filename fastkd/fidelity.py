"""Student-teacher fidelity (Stanton et al., "Does Knowledge Distillation Really Work?", 2021): how
closely a student's predictions match its teacher's, as opposed to how accurate either is.

    top-1 agreement  = mean_i [argmax_j s_ij = argmax_j p_ij]
    predictive KL    = mean_i KL(p_i || q_i),   q = softmax(s / T),  p = mean_k softmax(t_k / T)

for student logits s and teacher logits t (an ensemble of K teachers averages their tempered
softmaxes; its top-1 class is the argmax of p, a single teacher's that of its logits). The Triton
kernel reads both rows once (an ensemble's members twice: their log-sum-exps come first).
"""

from __future__ import annotations

import math
from typing import NamedTuple

from torch import Tensor

from fastkd import reference
from fastkd._backend import resolve_backend
from fastkd._host import unit_column_stride
from fastkd._validate import (
    check_choice,
    check_classes,
    check_logits,
    check_not_probs,
    check_probs,
    check_teacher,
    check_temperature,
    should_check_values,
)
from fastkd.calibration import CHUNK_ELEMENTS, INPUTS


class FidelityResult(NamedTuple):
    """What ``fidelity`` measured: the agreement and KL means over ``count`` rows (NaN means with none)."""

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
) -> FidelityResult:
    """Top-1 agreement and predictive KL(p_teacher || p_student) at ``temperature``, in one pass.

    Args:
        student_logits: (N, C) or (B, S, C), float16/bfloat16/float32/float64.
        teacher_logits: the student's shape, or (K,) + it for an ensemble of K teachers.
        temperature: T > 0, a float or a tensor of one value or one per row.
        input: ``"logits"``, or ``"probs"`` when both hold probabilities (tempered as softmax(log p / T);
            their logs are formed a chunk of rows at a time, at most 2^24 entries).
        backend: ``"auto"`` or a registered backend's name (see ``fastkd._backend``).
        validate_args: check tensor temperatures and probabilities (a host sync on CUDA).

    Returns ``FidelityResult(top1_agreement, predictive_kl, count)``; NaN means with no rows. The KL is
    infinite where the teacher gives mass to a class the student masks with -inf. With
    ``validate_args``, logits that look like probabilities (``fastkd.calibration``'s rule) and a row
    with no distribution (NaN, or all -inf: looked for only when the KL comes out NaN) raise a
    ``ValueError``; unchecked, such a row makes the KL NaN.
    """
    check_logits(student_logits, "student_logits")
    check_classes(student_logits, "student_logits")
    n_teachers = check_teacher(teacher_logits, student_logits)
    check_choice(input, INPUTS, "input")
    check_values = should_check_values(validate_args)
    temperature = check_temperature(temperature, student_logits, student_logits.dim() - 1, check_values=check_values)
    if isinstance(temperature, Tensor):
        temperature = temperature.detach().reshape(-1) if temperature.dim() else temperature.detach()
    impl = resolve_backend(backend, student_logits)
    n_classes = student_logits.shape[-1]
    student = unit_column_stride(student_logits.detach().reshape(-1, n_classes))
    teacher = unit_column_stride(teacher_logits.detach().reshape(n_teachers, -1, n_classes))
    for name, rows in (("student_logits", student), ("teacher_logits", teacher)):
        if input == "probs":
            check_probs(rows, name, check_values=check_values)
        else:
            check_not_probs(rows, name, check_values=check_values, fix='Pass input="probs" for probabilities')
    n_rows = student.shape[0]
    if input == "logits":
        agree, kl = impl.fidelity_pass(student, teacher, temperature)
        agree, kl = int(agree), float(kl)
    else:  # probabilities become logits log p a chunk of rows at a time
        step = max(1, CHUNK_ELEMENTS // (n_classes * (n_teachers + 1)))
        per_row_t = isinstance(temperature, Tensor) and temperature.dim() > 0
        agree, kl = 0, 0.0
        for start in range(0, n_rows, step):
            s, t = student[start : start + step], teacher[:, start : start + step]
            temp = temperature[start : start + step] if per_row_t else temperature
            same, chunk_kl = impl.fidelity_pass(reference.probs_as_logits(s), reference.probs_as_logits(t), temp)
            agree += int(same)
            kl += float(chunk_kl)
    if n_rows == 0:
        return FidelityResult(float("nan"), float("nan"), 0)
    if check_values and math.isnan(kl):
        for name, rows in (("student_logits", student), ("teacher_logits", teacher.reshape(-1, n_classes))):
            bad = rows.isnan().any(-1) | (rows.isneginf().all(-1) if input == "logits" else (rows == 0).all(-1))
            if bool(bad.any()):
                raise ValueError(f"{name}: row {int(bad.nonzero()[0, 0]) % n_rows} holds NaN or has no class of "
                                 "nonzero probability: the KL is NaN (validate_args=False returns it)")  # fmt: skip
    return FidelityResult(agree / n_rows, kl / n_rows, n_rows)
