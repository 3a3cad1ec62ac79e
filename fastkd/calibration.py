"""Calibration of a classifier's predictions: reliability statistics in one pass, the expected
calibration error (ECE) and a streaming meter.

**Binning convention** (every function here). The top-label confidence of a row is
c = max_j softmax(z / T)_j, computed in float32 from the logits z (float64 for float64 logits), and the
prediction is argmax_j z_j (its first index). With M equal bins, bin m = 1..M holds the confidences in
((m - 1)/M, m/M], compared exactly with m/M; a confidence of exactly 1.0 is in bin M (there is no extra
bin), and one that rounds to 1.0 in float32 is too. ``torchmetrics`` differs here, deliberately on our
side: its bins are [(m - 1)/M, m/M) and a confidence of 1.0 gets a bin of its own, M + 1, so that rows
the model is certain of (frequent once softmax rounds to 1) are scored apart from the last bin.
Elsewhere the two agree.

The calibration error over bins with n_m rows, mean confidence conf_m and accuracy acc_m (N rows)::

    "l1"   ECE = sum_m (n_m / N) |acc_m - conf_m|
    "l2"   RMS calibration error = sqrt(sum_m (n_m / N) (acc_m - conf_m)^2)
    "max"  MCE = max over non-empty bins of |acc_m - conf_m|

**Inputs.** Rows whose target is ``ignore_index`` are skipped everywhere (their values are not
checked). ``input="logits"`` (the default) takes logits; ``input="probs"`` probabilities (checked: in
[0, 1], summing to 1), tempered as softmax(log p / T) when T != 1 (the log taken as the rows are read).
Which of the two a tensor holds is never guessed; with ``validate_args``, logits whose first rows all
lie in [0, 1] and sum to 1 (rows a model does not emit as logits, and whose softmax would be a
plausible wrong answer) raise a ``ValueError`` that says to pass ``input="probs"``.

**Binary problems.** Logits of the target's own shape, one logit z per row with targets in {0, 1},
are a binary classifier's: the two classes' logits are (0, z), so p(class 1) = sigmoid(z / T)
(``input="probs"``: the rows are p(class 1)), the top-label confidence is max(p, 1 - p) and the
prediction [z > 0]. torchmetrics' ``binary_calibration_error`` scores p(class 1) against the target
instead: that is the class-1 term of ``classwise=True`` here, which for two classes equals the class-0
term (up to which end of a bin is closed), and so the classwise error.

**Rows with no distribution.** A counted row that holds NaN or whose logits are all -inf has no
distribution. With ``validate_args`` (the default) it raises a ``ValueError`` naming the row (looked
for only when a sum comes out NaN: no extra pass otherwise); unchecked, its confidence and NLL are
NaN (it is counted in the last bin), and so are the ECE, NLL and Brier score.
``expected_calibration_error`` of no rows (N = 0, or every target ignored) is a ``ValueError``;
``CalibrationStats`` of no rows give NaN means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastkd import reference
from fastkd._backend import check_backend_name, resolve_backend
from fastkd._host import unit_column_stride
from fastkd._validate import (
    check_choice,
    check_classes,
    check_ignore_index,
    check_int,
    check_logits,
    check_not_probs,
    check_number,
    check_probs,
    check_target,
    check_temperature,
    should_check_values,
)

NORMS = ("l1", "l2", "max")
BINNINGS = ("uniform", "adaptive")
INPUTS = ("logits", "probs")
CHUNK_ELEMENTS = 1 << 24  # rows x classes per step of classwise binning (64 MiB of float32)


@dataclass(frozen=True)
class CalibrationStats:
    """Sums over the rows seen, binned by top-label confidence (see the module doc for the bins).

    ``bin_count`` (M,) int64 rows per bin; ``bin_correct`` (M,) int64 correct predictions per bin;
    ``bin_confidence_sum`` (M,) float64; ``nll_sum`` and ``brier_sum`` 0-d float64: the sums of
    -log p_y and of the multiclass Brier score sum_j (p_j - [j = y])^2 (in [0, 2]) over the rows.
    Stats of disjoint sets of rows add with ``+``.
    """

    bin_count: Tensor
    bin_correct: Tensor
    bin_confidence_sum: Tensor
    nll_sum: Tensor
    brier_sum: Tensor

    @property
    def n_bins(self) -> int:
        return self.bin_count.numel()

    @property
    def count(self) -> int:
        """Rows counted."""
        return int(self.bin_count.sum())

    @property
    def accuracy(self) -> float:
        """Top-1 accuracy (NaN when no row was counted)."""
        return _ratio(self.bin_correct.sum(), self.count)

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood of the targets."""
        return _ratio(self.nll_sum, self.count)

    @property
    def brier(self) -> float:
        """Mean multiclass Brier score."""
        return _ratio(self.brier_sum, self.count)

    @property
    def bin_confidence(self) -> Tensor:
        """(M,) mean confidence per bin; NaN for an empty bin."""
        return self.bin_confidence_sum / self.bin_count

    @property
    def bin_accuracy(self) -> Tensor:
        """(M,) accuracy per bin; NaN for an empty bin."""
        return self.bin_correct.double() / self.bin_count

    @property
    def bin_edges(self) -> Tensor:
        """(M + 1,) the bins' edges 0, 1/M, ..., 1."""
        return torch.linspace(0, 1, self.n_bins + 1, dtype=torch.float64)

    def ece(self, norm: str = "l1") -> float:
        """The calibration error: ``"l1"`` ECE, ``"l2"`` RMS, ``"max"`` MCE (module doc); NaN with no rows."""
        check_choice(norm, NORMS, "norm")
        return float(bin_calibration_error(self.bin_count, self.bin_correct, self.bin_confidence_sum, norm))

    def __add__(self, other: CalibrationStats) -> CalibrationStats:
        if not isinstance(other, CalibrationStats):
            return NotImplemented
        if other.n_bins != self.n_bins:
            raise ValueError(f"cannot add calibration stats of {self.n_bins} and {other.n_bins} bins")
        return CalibrationStats(*(a + b.to(a.device) for a, b in zip(self._fields(), other._fields())))

    def _fields(self) -> tuple[Tensor, ...]:
        return self.bin_count, self.bin_correct, self.bin_confidence_sum, self.nll_sum, self.brier_sum


def _ratio(total: Tensor, count: int) -> float:
    return float(total) / count if count else float("nan")


def bin_calibration_error(count: Tensor, correct: Tensor, confidence_sum: Tensor, norm: str) -> Tensor:
    """The calibration error (module doc) of bins along the last dim, float64; NaN where no rows."""
    count = count.double()
    total = count.sum(-1)
    filled = count > 0
    gap = torch.where(filled, (correct.double() - confidence_sum) / count.clamp_min(1), 0.0).abs()
    if norm == "l1":
        error = (count * gap).sum(-1) / total
    elif norm == "l2":
        error = ((count * gap * gap).sum(-1) / total).sqrt()
    else:
        error = gap.amax(-1)
    return torch.where(total > 0, error, torch.nan)


def _prepare(
    logits: object,
    target: object,
    temperature: object,
    input: str,
    ignore_index: int,
    backend: str,
    validate_args: bool,
) -> tuple[Tensor, Tensor, float | Tensor, bool, str]:
    """Checked arguments as (rows (N, C) detached, targets (N,) contiguous, temperature (a float or a
    tensor of one value or N, detached), whether the rows are probabilities, the backend's
    implementation). Ignored rows are
    not value-checked (their probabilities or temperature may be padding). Binary logits (the target's
    shape) come back as two classes (module doc)."""
    check_logits(logits)
    check_choice(input, INPUTS, "input")
    probs = input == "probs"
    if isinstance(target, Tensor) and target.shape == logits.shape:
        logits = binary_as_two_classes(logits.detach(), probs)
    check_classes(logits)
    check_ignore_index(ignore_index)
    check_values = should_check_values(validate_args)
    check_target(target, logits, ignore_index, check_values=check_values)
    counted = target != ignore_index if check_values else None
    temperature = check_temperature(temperature, logits, logits.dim() - 1, check_values=check_values, rows=counted)
    if isinstance(temperature, Tensor):
        temperature = temperature.detach().reshape(-1) if temperature.dim() else temperature.detach()
    if probs:
        check_probs(logits, "logits", check_values=check_values, rows=counted)
    else:
        check_not_probs(logits, "logits", check_values=check_values, fix='Pass input="probs" for probabilities')
    impl = resolve_backend(backend, logits)
    rows = unit_column_stride(logits.detach().reshape(-1, logits.shape[-1]))
    return rows, target.reshape(-1).contiguous(), temperature, probs, impl


def binary_as_two_classes(scores: Tensor, probs: bool) -> Tensor:
    """A binary classifier's scores (...) as two classes (..., 2): logits (0, z), or probabilities (1 - p, p)."""
    if probs:
        return torch.stack([1 - scores, scores], -1)
    return torch.stack([torch.zeros_like(scores), scores], -1)


def no_distribution_error(rows: Tensor, target: Tensor, ignore_index: int, name: str = "logits") -> ValueError:
    """The error for a counted row of ``rows`` (N, C) that holds NaN or is all -inf (module doc)."""
    counted = target != ignore_index
    bad = (rows.isnan().any(-1) | rows.isneginf().all(-1)) & counted
    where = f"row {int(bad.nonzero()[0, 0])}" if bool(bad.any()) else "a row"
    return ValueError(f"{name}: {where} holds NaN or is all -inf: it has no distribution, so its confidence and "
                      "NLL are NaN (validate_args=False returns them as NaN)")  # fmt: skip


def _row_chunks(rows: Tensor, target: Tensor, temperature: float | Tensor):
    """(rows, target, temperature) in pieces of at most ``CHUNK_ELEMENTS`` entries (classwise binning)."""
    step = max(1, CHUNK_ELEMENTS // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        t = temperature
        if isinstance(t, Tensor) and t.dim():
            t = t[start : start + step]
        yield rows[start : start + step], target[start : start + step], t


def _top_label_rows(rows, target, temperature, probs, ignore_index, impl) -> tuple[Tensor, Tensor]:
    """(confidence, correct) of the rows not ignored."""
    out = impl.calibration_pass(rows, target, "rows", temperature, probs, ignore_index, 1)
    keep = out["correct"] >= 0
    return out["confidence"][keep], out["correct"][keep].bool()


def calibration_stats(
    logits: Tensor,
    target: Tensor,
    n_bins: int = 15,
    temperature: float | Tensor = 1.0,
    *,
    input: str = "logits",
    ignore_index: int = -100,
    backend: str = "auto",
    validate_args: bool = True,
) -> CalibrationStats:
    """Reliability statistics of ``logits`` against ``target`` in one read of the logits.

    Args:
        logits: (N, C) or (B, S, C) (any leading dims), float16/bfloat16/float32/float64; with
            ``input="probs"``, probabilities instead.
        target: int64 (or int32) class indices of the logits' shape without C; rows whose target is
            ``ignore_index`` are skipped.
        n_bins: M >= 1 equal-width confidence bins (module doc).
        temperature: T > 0, a float or a tensor of one value or one per row: the statistics of
            softmax(logits / T).
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see ``fastkd._backend``).
        validate_args: check target values and probabilities (a host sync on CUDA).

    The Triton kernel reads each logit once (no probability tensor is formed) and sums per-program
    partial bins without float atomics, so a result is the same on every run.
    """
    check_int(n_bins, "n_bins", 1)
    rows, target, temperature, probs, impl = _prepare(
        logits, target, temperature, input, ignore_index, backend, validate_args
    )
    out = impl.calibration_pass(rows, target, "bins", temperature, probs, ignore_index, n_bins)
    sums = CalibrationStats(out["bin_count"], out["bin_correct"], out["bin_confidence_sum"], out["nll"], out["brier"])
    if should_check_values(validate_args) and bool(sums.nll_sum.isnan() | sums.bin_confidence_sum[-1].isnan()):
        raise no_distribution_error(rows, target, ignore_index)
    return sums


def expected_calibration_error(
    logits: Tensor,
    target: Tensor,
    n_bins: int = 15,
    temperature: float | Tensor = 1.0,
    *,
    norm: str = "l1",
    binning: str = "uniform",
    classwise: bool = False,
    input: str = "logits",
    ignore_index: int = -100,
    backend: str = "auto",
    validate_args: bool = True,
) -> float:
    """The calibration error of ``logits`` against ``target`` (module doc for bins and norms).

    Args:
        binning: ``"uniform"`` M equal-width bins; ``"adaptive"`` M equal-mass bins: the row of rank r
            among N (ascending confidence) is in bin floor(r M / N), where equal confidences all take
            the rank of the first of them, so ties share a bin (with N < M some bins stay empty).
        classwise: the mean over the C classes of the calibration error of p_k against [y = k] (each
            class binned over all rows), instead of the top label's.
        Others as in ``calibration_stats``.

    Uniform top-label binning is ``calibration_stats(...).ece(norm)``, one read of the logits.
    Adaptive binning needs every row's confidence (one read, then a sort of N values). Classwise
    binning computes the probabilities in row chunks (the softmax kernel on ``backend``) and bins
    them with PyTorch; adaptive classwise binning holds all N x C probabilities, to sort each class.
    Raises ``ValueError`` when no row counts (N = 0, or every target is ``ignore_index``).
    """
    check_int(n_bins, "n_bins", 1)
    check_choice(norm, NORMS, "norm")
    check_choice(binning, BINNINGS, "binning")
    if not isinstance(classwise, bool):
        raise TypeError(f"classwise must be a bool, got {type(classwise).__name__}")
    if classwise:
        error = _classwise_error(logits, target, n_bins, norm, binning, temperature, input, ignore_index, backend,
                                 validate_args)  # fmt: skip
    elif binning == "uniform":
        error = calibration_stats(logits, target, n_bins, temperature, input=input, ignore_index=ignore_index,
                                  backend=backend, validate_args=validate_args).ece(norm)  # fmt: skip
    else:
        rows, target, temperature, probs, impl = _prepare(
            logits, target, temperature, input, ignore_index, backend, validate_args
        )
        confidence, correct = _top_label_rows(rows, target, temperature, probs, ignore_index, impl)
        if should_check_values(validate_args) and bool(confidence.isnan().any()):
            raise no_distribution_error(rows, target, ignore_index)
        bins = reference.adaptive_bins(confidence, n_bins)
        error = float(bin_calibration_error(*reference.binned_sums(bins, correct, confidence, n_bins), norm))
    if math.isnan(error) and not bool((target != ignore_index).any()):
        rows = f"every one of the {target.numel()} targets is ignore_index={ignore_index}" if target.numel() else "0 rows"
        raise ValueError(f"no rows to score: {rows}")
    return error


def _classwise_error(logits, target, n_bins, norm, binning, temperature, input, ignore_index, backend,
                     validate_args) -> float:  # fmt: skip
    """``expected_calibration_error(..., classwise=True)``."""
    from fastkd.softmax import tempered_softmax

    rows, target, temperature, probs, impl = _prepare(
        logits, target, temperature, input, ignore_index, backend, validate_args
    )
    n_classes = rows.shape[1]
    classes = torch.arange(n_classes, device=rows.device)
    flat_bins = n_classes * n_bins  # (class, bin) as one flat index
    sums = [torch.zeros(flat_bins, dtype=dtype, device=rows.device) for dtype in (torch.int64, torch.int64, torch.float64)]
    kept = []  # adaptive binning sorts each class: it keeps every chunk's probabilities
    for x, y, t in _row_chunks(rows, target, temperature):
        valid = y != ignore_index
        if isinstance(t, Tensor) and t.dim():
            t = t[valid]
        x, y = x[valid], y[valid]
        x = x.to(reference.compute_dtype(x.dtype))  # probabilities in float32 even for 16-bit logits
        if not probs:
            p = tempered_softmax(x, t, backend=impl.NAME, validate_args=False)
        elif reference.is_tempered(t):
            p = tempered_softmax(reference.probs_as_logits(x), t, backend=impl.NAME, validate_args=False)
        else:
            p = x
        if should_check_values(validate_args) and bool(p.isnan().any()):
            raise no_distribution_error(rows, target, ignore_index)
        hit = y.unsqueeze(1) == classes
        if binning == "adaptive":
            kept.append((p, hit))
            continue
        for total, part in zip(sums, reference.binned_sums(reference.confidence_bins(p, n_bins) + classes * n_bins, hit, p, flat_bins)):
            total += part
    if binning == "adaptive" and kept:
        p = torch.cat([p for p, _ in kept]).T.contiguous()  # (C, N)
        hit = torch.cat([h for _, h in kept]).T
        first_rank = torch.searchsorted(p.sort(1).values, p, right=False)
        bins = first_rank * n_bins // p.shape[1] + (classes * n_bins).unsqueeze(1)
        sums = reference.binned_sums(bins, hit, p, flat_bins)
    count, correct, confidence_sum = (s.view(n_classes, n_bins) for s in sums)
    return float(bin_calibration_error(count, correct, confidence_sum, norm).mean())


class CalibrationMeter(nn.Module):
    """Streaming reliability statistics over many batches, in O(n_bins) memory (the samples are not kept).

    ``update(logits, target)`` adds a batch (``calibration_stats`` with this meter's settings);
    ``compute()`` returns the ``CalibrationStats`` of everything seen, summed over the processes of the
    default group (or ``process_group``) when ``torch.distributed`` is initialized, without changing
    the local state; ``reset()`` starts over. The state is registered buffers: ``state_dict()`` /
    ``load_state_dict()`` save and resume a long evaluation, ``.to(device)`` moves it, and a dtype cast
    leaves it as it is (int64 counts, float64 sums).
    """

    def __init__(
        self,
        n_bins: int = 15,
        temperature: float = 1.0,
        *,
        input: str = "logits",
        ignore_index: int = -100,
        backend: str = "auto",
        process_group=None,
    ) -> None:
        super().__init__()
        check_int(n_bins, "n_bins", 1)
        check_choice(input, INPUTS, "input")
        check_backend_name(backend)
        check_ignore_index(ignore_index)
        if isinstance(temperature, Tensor):
            if temperature.numel() != 1:
                raise ValueError(f"temperature must be one value for every batch, got shape {tuple(temperature.shape)}")
            temperature = temperature.item()
        temperature = check_number(temperature, "temperature", 0.0, math.inf, low_open=True, high_open=True)
        self.n_bins, self.temperature, self.input = n_bins, temperature, input
        self.ignore_index, self.backend, self.process_group = ignore_index, backend, process_group
        self.register_buffer("bin_count", torch.zeros(n_bins, dtype=torch.int64))
        self.register_buffer("bin_correct", torch.zeros(n_bins, dtype=torch.int64))
        self.register_buffer("bin_confidence_sum", torch.zeros(n_bins, dtype=torch.float64))
        self.register_buffer("nll_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("brier_sum", torch.zeros((), dtype=torch.float64))

    def _state(self) -> tuple[Tensor, ...]:
        return self.bin_count, self.bin_correct, self.bin_confidence_sum, self.nll_sum, self.brier_sum

    def _apply(self, fn, recurse=True):
        """Moves the state with the module (``.to(device)``, ``.cuda()``) but keeps its dtypes: a model
        cast to bfloat16 with its meter inside must not round the float64 sums."""
        state = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in state.items():
            if self._buffers[name].dtype != old.dtype:
                self._buffers[name] = old.to(self._buffers[name].device)
        return self

    @torch.no_grad()
    def update(self, logits: Tensor, target: Tensor) -> None:
        stats = calibration_stats(logits, target, self.n_bins, self.temperature, input=self.input,
                                  ignore_index=self.ignore_index, backend=self.backend)  # fmt: skip
        for total, part in zip(self._state(), stats._fields()):
            total += part.to(total.device)

    def forward(self, logits: Tensor, target: Tensor) -> None:
        self.update(logits, target)

    def compute(self) -> CalibrationStats:
        state = self._state()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
            packed = torch.cat([t.double().reshape(-1) for t in state])  # counts are exact in float64 to 2^53
            if dist.get_backend(self.process_group) == "nccl":  # NCCL reduces CUDA tensors only
                packed = packed.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(packed, group=self.process_group)
            packed = packed.to(self.bin_count.device)
            m = self.n_bins
            count, correct, confidence_sum = packed[:m], packed[m : 2 * m], packed[2 * m : 3 * m]
            return CalibrationStats(count.long(), correct.long(), confidence_sum, packed[3 * m], packed[3 * m + 1])
        return CalibrationStats(*(t.clone() for t in state))

    def reset(self) -> None:
        for t in self._state():
            t.zero_()

    def extra_repr(self) -> str:
        return f"n_bins={self.n_bins}, temperature={self.temperature}, input={self.input!r}"
