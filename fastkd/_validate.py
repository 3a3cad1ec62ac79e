"""Argument checks shared by every fastkd op.

Each check raises a ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape, value or
device) whose message starts with the argument's name. Checks on types, shapes and devices read no
tensor data and always run; checks on tensor values (a temperature <= 0, say) read device memory,
which synchronizes a CUDA stream: they run when ``validate_args`` is true and are skipped inside
``torch.compile``, where data-dependent Python control flow would break the graph.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_logits(logits: object, name: str = "logits") -> None:
    """A floating-point tensor of at least one dimension (the classes)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of class scores, got {logits.dtype}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} dtype {logits.dtype} is not supported: use float16, bfloat16, float32 or float64")
    if logits.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension (the classes), got a 0-d tensor")


def check_dim(dim: object, ndim: int, name: str = "dim") -> int:
    """An int in [-ndim, ndim); returned non-negative."""
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise TypeError(f"{name} must be an int, got {type(dim).__name__}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{name}={dim} is out of range for a tensor with {ndim} dimension(s)")
    return dim % ndim


def should_check_values(validate_args: bool) -> bool:
    """Whether to run the checks that read tensor data (see the module doc)."""
    return validate_args and not torch.compiler.is_compiling()


def check_scalar_temperature(temperature: object, name: str = "temperature") -> None:
    """A temperature's type (a float or a tensor) and, for a float, its value: finite and > 0."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(temperature).__name__}")
    if not isinstance(temperature, torch.Tensor) and not 0 < temperature < math.inf:
        # comparisons, not math.isfinite: torch.compile traces them
        raise ValueError(f"{name} must be finite and > 0, got {temperature}")


def check_ignore_index(ignore_index: object) -> None:
    """An int (not a bool)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def check_classes(logits: torch.Tensor, name: str = "logits") -> None:
    """At least one class along the last dimension."""
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one class (the last dimension is 0)")


def check_temperature(
    temperature: object,
    logits: torch.Tensor,
    dim: int,
    *,
    check_values: bool,
    name: str = "temperature",
    rows: torch.Tensor | None = None,
) -> float | torch.Tensor:
    """A temperature for softmax(logits / T) along ``dim``: finite and > 0.

    Accepts a Python number, a one-element tensor, or a tensor with one value per row: the shape of
    ``logits`` without ``dim`` (or with size 1 at ``dim``). Returns the number as given, or a 0-d
    tensor or a tensor of the row shape on the logits' device (a 0-d CPU tensor is moved there, as
    PyTorch treats CPU scalars). ``rows``, a bool mask of the row shape, limits the value check of a
    per-row temperature to the rows that count (e.g. not ``ignore_index``).
    """
    check_scalar_temperature(temperature, name)
    if not isinstance(temperature, torch.Tensor):
        return temperature

    if not temperature.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {temperature.dtype}")
    row_shape = logits.shape[:dim] + logits.shape[dim + 1 :]
    if temperature.numel() == 1:
        temperature = temperature.reshape(())
    elif temperature.shape == logits.shape[:dim] + (1,) + logits.shape[dim + 1 :]:
        temperature = temperature.squeeze(dim)
    elif temperature.shape != row_shape:
        raise ValueError(
            f"{name} must be a scalar or hold one value per row, shape {tuple(row_shape)} (the logits' "
            f"shape {tuple(logits.shape)} without dim={dim}); got shape {tuple(temperature.shape)}"
        )
    if temperature.device != logits.device:
        if temperature.dim() != 0 or temperature.device.type != "cpu":
            raise ValueError(f"{name} is on {temperature.device} but logits are on {logits.device}")
        temperature = temperature.to(logits.device)
    if check_values:
        bad = ~(torch.isfinite(temperature) & (temperature > 0))
        if rows is not None and temperature.dim():
            bad &= rows
        if bool(bad.any()):
            raise ValueError(f"{name} must be finite and > 0, got {temperature[bad].flatten()[0].item()}")
    return temperature


def check_choice(value: object, choices, name: str) -> None:
    """One of ``choices`` (a ValueError listing them otherwise)."""
    if not any(value is c or (type(value) is type(c) and value == c) for c in choices):
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_number(
    value: object, name: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> float:
    """A real number (not a bool or tensor) in the interval from ``low`` to ``high``, ends open as told."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    above = low < value if low_open else low <= value
    below = value < high if high_open else value <= high
    if not (above and below):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return float(value)


def check_target(
    target: object, logits: torch.Tensor, ignore_index: int, *, check_values: bool, name: str = "target"
) -> None:
    """Class indices: an int32/int64 tensor of the logits' row shape (``logits.shape[:-1]``) on their
    device, each in [0, V) or ``ignore_index`` (read only when ``check_values``)."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must hold class indices as int64 (or int32), got {target.dtype}")
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"{name} must have the logits' shape without the class dimension, {tuple(logits.shape[:-1])}; "
            f"got {tuple(target.shape)}"
        )
    if target.device != logits.device:
        raise ValueError(f"{name} is on {target.device} but the logits are on {logits.device}")
    if check_values and target.numel():
        n_classes = logits.shape[-1]
        lowest, highest = torch.stack(target.masked_fill(target == ignore_index, 0).aminmax()).tolist()
        if lowest < 0 or highest >= n_classes:  # one read, one sync; the message's index found only here
            bad = ((target < 0) | (target >= n_classes)) & (target != ignore_index)
            hint = ""
            if n_classes == 1:
                hint = (f": the logits have a single class; for a binary classifier's one logit per row, pass "
                        f"logits of the target's shape {tuple(target.shape)} (or two classes)")  # fmt: skip
            raise ValueError(
                f"{name} holds class index {target[bad].flatten()[0].item()}, outside [0, {n_classes}) "
                f"and not ignore_index={ignore_index}{hint}"
            )


def check_teacher(teacher: object, student: torch.Tensor) -> int:
    """The number of ensemble members K: ``teacher`` is the student's shape, or (K,) + it."""
    check_logits(teacher, "teacher_logits")
    if teacher.device != student.device:
        raise ValueError(f"teacher_logits are on {teacher.device} but student_logits are on {student.device}")
    if teacher.shape[-1] != student.shape[-1]:
        raise ValueError(
            f"teacher_logits have {teacher.shape[-1]} classes but student_logits have {student.shape[-1]}: "
            "teacher and student must share the vocabulary (the last dimension)"
        )
    if teacher.shape == student.shape:
        return 1
    if teacher.shape[1:] == student.shape and teacher.shape[0] > 0:
        return teacher.shape[0]
    raise ValueError(
        f"teacher_logits must have the student's shape {tuple(student.shape)}, or (K,) + it for an ensemble "
        f"of K >= 1 teachers; got {tuple(teacher.shape)}"
    )


def check_int(value: object, name: str, low: int) -> int:
    """An int (not a bool) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def check_probs(probs: torch.Tensor, name: str, *, check_values: bool, rows: torch.Tensor | None = None) -> None:
    """Rows of probabilities (last dim): each entry in [0, 1] and each row summing to 1 within
    max(1e-3, 4 eps) for the dtype's eps (the rounding of a probability vector stored in that dtype).
    ``rows``, a bool mask of the row shape, limits the check to the rows that count. Read only when
    ``check_values``."""
    if not check_values or probs.numel() == 0:
        return
    outside = ((probs < 0) | (probs > 1) | probs.isnan()).any(-1)
    sums = probs.sum(-1, dtype=torch.float64)
    if rows is not None:
        outside &= rows
        sums = torch.where(rows, sums, 1.0)
    if bool(outside.any()):
        raise ValueError(f"{name}: input='probs' needs probabilities in [0, 1], got entries outside it")
    tol = max(1e-3, 4 * torch.finfo(probs.dtype).eps)
    sums = sums.flatten()
    worst = sums[(sums - 1).abs().argmax()].item()
    if abs(worst - 1) > tol:
        raise ValueError(
            f"{name}: input='probs' needs rows that sum to 1 (within {tol:g}); a row sums to {worst:.6g}. "
            "Pass logits with input='logits', or normalize the rows"
        )


PROBE_ROWS = 8  # rows read by check_not_probs


def check_not_probs(logits: torch.Tensor, name: str, *, check_values: bool, fix: str) -> None:
    """Logits, not probabilities: a ``ValueError`` naming ``name`` (and saying ``fix``) when the first
    ``PROBE_ROWS`` rows (last dim, at least 2 classes) all lie in [0, 1] and each sums to 1 within
    max(1e-3, 4 eps): rows a model does not emit as logits, and that a softmax would flatten into a
    plausible wrong answer. Reads those rows only when ``check_values``."""
    if not check_values or logits.dim() == 0 or logits.shape[-1] < 2 or logits.numel() == 0:
        return
    rows = logits.detach().reshape(-1, logits.shape[-1])[:PROBE_ROWS]
    lowest, highest = torch.stack(rows.aminmax()).tolist()  # NaN: neither comparison holds, not probabilities
    if not (lowest >= 0 and highest <= 1):
        return
    tol = max(1e-3, 4 * torch.finfo(logits.dtype).eps)
    if bool(((rows.sum(-1, dtype=torch.float64) - 1).abs() <= tol).all()):
        raise ValueError(
            f"{name} look like probabilities, not logits: each of the first {rows.shape[0]} row(s) lies in [0, 1] "
            f"and sums to 1. {fix} (or validate_args=False if these really are logits)"
        )


def check_topk(
    teacher_topk: object, student: torch.Tensor, values_are: str, *, check_values: bool, rows: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse teacher ``(indices, values)``: int32/int64 indices and float values, each of the student's
    row shape + (k,) with 1 <= k <= V, on its device. With ``check_values``, over the ``rows`` that count
    (a bool mask of the row shape, or None for all): indices in [0, V) and distinct within a row; values
    not NaN, log-probabilities <= 0 whose e^v sum to at most 1 (within max(1e-3, 4 eps)), logits < +inf.
    Returns the pair."""
    if not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) != 2:
        raise TypeError(f"teacher_topk must be a pair (indices, values), got {type(teacher_topk).__name__}")
    indices, values = teacher_topk
    for name, tensor in (("indices", indices), ("values", values)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"teacher_topk {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device != student.device:
            raise ValueError(f"teacher_topk {name} are on {tensor.device} but student_logits are on {student.device}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"teacher_topk indices must be int64 (or int32) class indices, got {indices.dtype}")
    if values.dtype not in FLOAT_DTYPES:
        raise TypeError(f"teacher_topk values must be a float tensor, got {values.dtype}")
    n_classes = student.shape[-1]
    if indices.shape != values.shape or indices.shape[:-1] != student.shape[:-1] or indices.dim() != student.dim():
        raise ValueError(
            f"teacher_topk indices and values must both have the student's row shape + (k,), "
            f"{tuple(student.shape[:-1])} + (k,); got {tuple(indices.shape)} and {tuple(values.shape)}"
        )
    k = indices.shape[-1]
    if not 1 <= k <= n_classes:
        raise ValueError(f"teacher_topk must give 1 <= k <= V = {n_classes} entries a row, got k = {k}")
    if not check_values or indices.numel() == 0:
        return indices, values
    if rows is not None:
        indices, values = indices[rows], values[rows]
    if bool(((indices < 0) | (indices >= n_classes)).any()):
        bad = indices[(indices < 0) | (indices >= n_classes)][0].item()
        raise ValueError(f"teacher_topk indices hold class index {bad}, outside [0, {n_classes})")
    ordered = indices.sort(-1).values
    if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
        raise ValueError("teacher_topk indices must be distinct within a row; a row repeats a class")
    if bool(values.isnan().any()):
        raise ValueError("teacher_topk values hold NaN")
    if values_are == "logprobs":
        if bool((values > 0).any()):
            raise ValueError(f"teacher_topk values are log-probabilities (values_are='logprobs') and must be <= 0; "
                             f"got {values.max().item():.6g}; pass values_are='logits' for logits")  # fmt: skip
        mass = values.double().exp().sum(-1)
        tol = max(1e-3, 4 * torch.finfo(values.dtype).eps)
        if mass.numel() and mass.max().item() > 1 + tol:
            raise ValueError(f"teacher_topk log-probabilities of a row sum to {mass.max().item():.6g} in probability "
                             f"(at most 1 within {tol:g})")  # fmt: skip
    elif bool((values == float("inf")).any()):
        raise ValueError("teacher_topk logits hold +inf")
    return teacher_topk[0], teacher_topk[1]
