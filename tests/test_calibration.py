"""calibration_stats and expected_calibration_error against float64 computations and torchmetrics."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from conftest import DEVICE, DTYPES, TOL
from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

import fastkd
from fastkd import reference

# 2500 (bf16, fp16) and 4097 (every dtype): rows read as an aligned body and an edge
SHAPES = [(1, 1), (1, 10), (37, 10), (33, 2), (16, 1000), (5, 2500), (6, 4097), (3, 32000)]


def _case(n, c, dtype=torch.float32, scale=3.0, seed=0, ignore_every=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, c, generator=g) * scale).to(dtype)
    target = torch.randint(0, c, (n,), generator=g)
    if ignore_every:
        target[::ignore_every] = -100
    return logits.to(DEVICE), target.to(DEVICE)


def _expected(logits, target, n_bins=15, temperature=1.0, probs=False):
    """The float64 reference's sums, as CalibrationStats."""
    count, confidence_sum, correct, nll, brier = reference.calibration_sums(
        logits.double(), target, n_bins, temperature, -100, probs
    )
    return fastkd.CalibrationStats(count, correct, confidence_sum, nll, brier)


def _assert_stats(got, expected):
    """Bin counts exact; sums to the float32 math's rounding (the inputs are exact in float64)."""
    assert torch.equal(got.bin_count.cpu(), expected.bin_count.cpu())
    assert torch.equal(got.bin_correct.cpu(), expected.bin_correct.cpu())
    tol = TOL[torch.float32]
    scale = max(expected.count, 1)
    torch.testing.assert_close(got.bin_confidence_sum.cpu(), expected.bin_confidence_sum.cpu(), rtol=tol, atol=tol)
    for name in ("nll_sum", "brier_sum"):
        torch.testing.assert_close(getattr(got, name).cpu(), getattr(expected, name).cpu(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_stats_match_float64(backend, shape, dtype):
    logits, target = _case(*shape, dtype=dtype, ignore_every=4)
    got = fastkd.calibration_stats(logits, target, backend=backend)
    _assert_stats(got, _expected(logits, target))
    assert got.count == int((target != -100).sum())


@pytest.mark.parametrize("input", ["logits", "probs"])
def test_top1_ties_across_a_rows_edge(backend, input):
    """The first index of a row's max is its prediction when the tie spans the row's edge and its
    aligned body (head before body, body before tail); rows of 4097 start at every offset mod 8."""
    n, width = 8, 4097
    logits, _ = _case(n, width, dtype=torch.bfloat16)
    first, second = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    for r in range(n):
        head = (-r * width) % 8  # columns before row r's aligned body (bf16: 8 entries a vector)
        first[r], second[r] = (max(head - 1, 0), 100) if r % 2 else (50, width - 1)
    rows = torch.arange(n)
    logits[rows, first], logits[rows, second] = 20.0, 20.0
    x = logits if input == "logits" else torch.softmax(logits.double(), -1).to(torch.bfloat16)
    x[rows, second] = x[rows, first]  # the tie, exact in the input's dtype
    for target, correct in ((first, n), (second, 0)):  # the first of the tie is the prediction
        target = target.to(DEVICE)
        got = fastkd.calibration_stats(x, target, input=input, backend=backend, validate_args=False)
        assert int(got.bin_correct.sum()) == correct
        _assert_stats(got, _expected(x, target, probs=input == "probs"))


@pytest.mark.parametrize("n_bins", [1, 2, 10, 15, 100, 1500])
def test_bins_and_temperatures(backend, n_bins):
    logits, target = _case(64, 100, scale=4.0, seed=n_bins)
    for temperature in (0.5, 2.0, torch.tensor(3.0), torch.rand(64, device=DEVICE) * 3 + 0.25):
        got = fastkd.calibration_stats(logits, target, n_bins, temperature, backend=backend)
        _assert_stats(got, _expected(logits, target, n_bins, temperature))


def test_batched_and_strided_inputs(backend):
    logits, target = _case(4 * 9, 50, ignore_every=5)
    expected = _expected(logits, target)
    _assert_stats(fastkd.calibration_stats(logits.view(4, 9, 50), target.view(4, 9), backend=backend), expected)
    wide = torch.zeros(36, 120, device=DEVICE)
    wide[:, 7:57] = logits  # row stride 120
    _assert_stats(fastkd.calibration_stats(wide[:, 7:57], target, backend=backend), expected)
    columns = logits.T.contiguous().T  # column stride 36: copied to unit stride for the kernel
    _assert_stats(fastkd.calibration_stats(columns, target, backend=backend), expected)


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
@pytest.mark.parametrize("n_bins", [5, 15])
def test_ece_matches_torchmetrics(backend, norm, n_bins):
    logits, target = _case(300, 10, scale=2.0, seed=n_bins)
    expected = multiclass_calibration_error(logits.cpu(), target.cpu(), 10, n_bins, norm).item()
    got = fastkd.expected_calibration_error(logits, target, n_bins, norm=norm, backend=backend)
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_ece_definition(backend):
    """ECE, RMS and MCE from the bins of the float64 reference, by the formulas of the module doc."""
    logits, target = _case(500, 7, scale=2.5)
    stats = _expected(logits, target, 10)
    filled = stats.bin_count > 0
    weight = stats.bin_count[filled].double() / stats.count
    gap = (stats.bin_accuracy - stats.bin_confidence)[filled].abs()
    for norm, expected in (("l1", (weight * gap).sum()), ("l2", (weight * gap**2).sum().sqrt()), ("max", gap.max())):
        got = fastkd.expected_calibration_error(logits, target, 10, norm=norm, backend=backend)
        assert got == pytest.approx(expected.item(), rel=1e-5)


def test_confidence_one_is_in_the_last_bin(backend):
    """The one deliberate difference from torchmetrics: a confidence of exactly 1.0 (here from a margin
    of 1e4, which rounds softmax to 1 in float32) is in bin M with the confidences just below it;
    torchmetrics gives it a bin M + 1 of its own, so the two ECEs differ."""
    certain = torch.tensor([[0.0, -1e4, -1e4]]).repeat(6, 1)
    hesitant = torch.tensor([[2.5, 0.0, 0.0]]).repeat(4, 1)  # confidence 0.859
    logits = torch.cat([certain, hesitant]).to(DEVICE)
    target = torch.tensor([0, 0, 0, 1, 1, 1, 0, 0, 0, 0], device=DEVICE)  # 3 of 6 certain rows wrong
    stats = fastkd.calibration_stats(logits, target, n_bins=5, backend=backend)
    assert stats.bin_count.tolist() == [0, 0, 0, 0, 10]
    confidence = 6 + 4 * math.exp(2.5) / (math.exp(2.5) + 2)
    assert stats.ece() == pytest.approx(abs(7 - confidence) / 10, rel=1e-6)
    torchmetrics_ece = multiclass_calibration_error(logits.cpu(), target.cpu(), 3, 5).item()
    hesitant_confidence = (confidence - 6) / 4
    hidden_bin = (6 / 10) * abs(0.5 - 1.0) + (4 / 10) * abs(1.0 - hesitant_confidence)
    assert torchmetrics_ece == pytest.approx(hidden_bin, rel=1e-5)
    assert abs(torchmetrics_ece - stats.ece()) > 0.05


@pytest.mark.parametrize("n_classes, n_bins, expected_bin", [(2, 2, 0), (2, 4, 1), (4, 4, 0), (4, 8, 1), (2, 10, 4), (8, 4, 0)])
def test_confidences_on_bin_edges(backend, n_classes, n_bins, expected_bin):
    """Bin m holds ((m - 1)/M, m/M]: C equal logits give a confidence of exactly 1/C (a power of 2), on
    the edge m/M = 1/C, in bin m (0-based m - 1). torchmetrics's bins, [(m - 1)/M, m/M), put it in m + 1."""
    logits = torch.zeros(3, n_classes, device=DEVICE)
    target = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    stats = fastkd.calibration_stats(logits, target, n_bins, backend=backend)
    assert stats.bin_count.nonzero().flatten().tolist() == [expected_bin]


@pytest.mark.parametrize("n_classes, n_bins", [(3, 15), (5, 5), (10, 10), (15, 15), (20, 20)])
def test_backends_bin_ties_alike(n_classes, n_bins):
    """Confidence 1/C of C equal logits, near an edge m/M in float32: both backends form it as 1 / d,
    correctly rounded, so they put it in the same bin."""
    logits = torch.zeros(4, n_classes, device=DEVICE)
    target = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    bins = [fastkd.calibration_stats(logits, target, n_bins, backend=b).bin_count.tolist() for b in ("torch", "triton")]
    assert bins[0] == bins[1]


def test_extreme_and_masked_logits(backend):
    logits, target = _case(40, 30, scale=1e4)
    logits[:, 5:9] = float("-inf")  # masked classes
    target = torch.where((target >= 5) & (target < 9), 0, target)
    got = fastkd.calibration_stats(logits, target, backend=backend)
    _assert_stats(got, _expected(logits, target))
    assert math.isfinite(got.nll) and math.isfinite(got.brier)


def test_target_logit_masked_gives_infinite_nll(backend):
    logits = torch.tensor([[1.0, float("-inf"), 0.5]], device=DEVICE)
    stats = fastkd.calibration_stats(logits, torch.tensor([1], device=DEVICE), backend=backend)
    assert stats.nll == math.inf and stats.accuracy == 0


@pytest.mark.parametrize("correct", [True, False])
def test_all_correct_and_all_wrong(backend, correct):
    logits, _ = _case(50, 6)
    target = logits.argmax(-1) if correct else (logits.argmax(-1) + 1) % 6
    stats = fastkd.calibration_stats(logits, target, backend=backend)
    assert stats.accuracy == (1.0 if correct else 0.0)
    mean_confidence = torch.softmax(logits.double(), -1).amax(-1).mean().item()
    expected = 1 - mean_confidence if correct else mean_confidence
    assert stats.ece() == pytest.approx(expected, rel=1e-5)


def test_all_rows_ignored_and_no_rows(backend):
    """Stats of no rows are empty sums with NaN means; an ECE of no rows is an error, never a silent NaN."""
    logits, target = _case(5, 4)
    ignored = torch.full_like(target, -100)
    stats = fastkd.calibration_stats(logits, ignored, backend=backend)
    assert stats.count == 0 and math.isnan(stats.ece()) and math.isnan(stats.accuracy)
    empty = fastkd.calibration_stats(logits[:0], target[:0], backend=backend)
    assert empty.count == 0 and empty.bin_count.shape == (15,)
    for binning in ("uniform", "adaptive"):
        for classwise in (False, True):
            kwargs = dict(binning=binning, classwise=classwise, backend=backend)
            with pytest.raises(ValueError, match="no rows to score: 0 rows"):
                fastkd.expected_calibration_error(logits[:0], target[:0], **kwargs)
            with pytest.raises(ValueError, match="every one of the 5 targets is ignore_index=-100"):
                fastkd.expected_calibration_error(logits, ignored, **kwargs)


def test_single_class(backend):
    stats = fastkd.calibration_stats(torch.randn(4, 1, device=DEVICE), torch.zeros(4, dtype=torch.int64, device=DEVICE),
                                     backend=backend)  # fmt: skip
    assert stats.accuracy == 1 and stats.ece() == 0 and stats.nll == 0 and stats.brier == 0


def test_probs_input(backend):
    logits, target = _case(60, 12, ignore_every=7)
    probs = torch.softmax(logits.double(), -1).float()
    for temperature in (1.0, 2.0):
        got = fastkd.calibration_stats(probs, target, 15, temperature, input="probs", backend=backend)
        expected = _expected(logits, target, 15, temperature)
        assert torch.equal(got.bin_count.cpu(), expected.bin_count.cpu())
        assert got.nll == pytest.approx(expected.nll, rel=1e-5) and got.brier == pytest.approx(expected.brier, rel=1e-5)
        assert got.ece() == pytest.approx(expected.ece(), rel=1e-5, abs=1e-7)


def test_ignored_rows_are_not_value_checked(backend):
    """Padding rows (ignored) may hold anything: all-zero 'probabilities', a temperature of 0."""
    logits, target = _case(40, 9, ignore_every=0)
    probs = torch.softmax(logits.double() * 2, -1).float()
    probs[:, 3] = 0.0  # a class of probability 0: log p = -inf when tempered
    probs /= probs.sum(-1, keepdim=True)
    padded, padded_target = torch.cat([probs, torch.zeros(5, 9, device=DEVICE)]), torch.cat([target, torch.full((5,), -100, device=DEVICE)])
    temperature = torch.cat([torch.rand(40, device=DEVICE) + 0.5, torch.zeros(5, device=DEVICE)])
    for t_padded, t in ((2.0, 2.0), (temperature, temperature[:40])):
        got = fastkd.calibration_stats(padded, padded_target, 15, t_padded, input="probs", backend=backend)
        _assert_stats(got, _expected(probs, target, 15, t, probs=True))
    for binning, classwise in (("uniform", True), ("adaptive", False)):
        kwargs = dict(temperature=2.0, input="probs", binning=binning, classwise=classwise, backend=backend)
        expected = fastkd.expected_calibration_error(probs, target, **kwargs)
        assert fastkd.expected_calibration_error(padded, padded_target, **kwargs) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="sum to 1"):  # a counted row is checked
        fastkd.calibration_stats(padded, torch.zeros_like(padded_target), input="probs", backend=backend)
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        fastkd.calibration_stats(padded, torch.zeros_like(padded_target), 15, temperature, input="probs", backend=backend)


def test_row_of_all_neg_inf_has_no_distribution(backend):
    """A counted row with no distribution, unchecked: NaN confidence and NLL, counted in the last bin, on
    both backends (checked, it raises: test_rows_with_no_distribution_raise)."""
    logits = torch.tensor([[-math.inf] * 3, [1.0, 0.0, 0.0]], device=DEVICE)
    stats = fastkd.calibration_stats(logits, torch.tensor([0, 0], device=DEVICE), backend=backend, validate_args=False)
    assert stats.bin_count.tolist() == [0] * 8 + [1] + [0] * 5 + [1]  # [1, 0, 0]: confidence 0.576 in bin 9
    assert math.isnan(stats.ece()) and math.isnan(stats.nll) and math.isnan(stats.bin_confidence_sum[-1])


def test_stats_carry_no_autograd_graph(backend):
    logits, target = _case(20, 7)
    logits.requires_grad_(True)
    stats = fastkd.calibration_stats(logits, target, 15, torch.full((20,), 2.0, device=DEVICE, requires_grad=True),
                                     backend=backend)  # fmt: skip
    assert not any(t.requires_grad for t in stats._fields())


def test_probs_match_torchmetrics_on_probabilities(backend):
    """Probabilities given as they are (T = 1): the same bins torchmetrics forms from them."""
    logits, target = _case(200, 8, scale=1.5)
    probs = torch.softmax(logits, -1)
    expected = multiclass_calibration_error(probs.cpu(), target.cpu(), 8, 15).item()
    assert fastkd.expected_calibration_error(probs, target, input="probs", backend=backend) == pytest.approx(expected, rel=1e-5)


def test_adaptive_bins_hold_equal_mass(backend):
    logits, target = _case(200, 10, scale=2.0)
    confidence = torch.softmax(logits.double(), -1).amax(-1)
    correct = (logits.argmax(-1) == target).double()
    order = confidence.argsort()
    gaps = [(correct[idx].sum() - confidence[idx].sum()).abs() for idx in order.chunk(8)]  # 8 bins of 25
    expected = (sum(gaps) / 200).item()
    assert fastkd.expected_calibration_error(logits, target, 8, binning="adaptive", backend=backend) == pytest.approx(
        expected, rel=1e-5
    )


def test_adaptive_ties_and_few_rows(backend):
    logits = torch.zeros(6, 4, device=DEVICE)  # every confidence 0.25: one bin
    target = torch.tensor([0, 0, 1, 2, 3, 0], device=DEVICE)
    assert fastkd.expected_calibration_error(logits, target, 4, binning="adaptive", backend=backend) == pytest.approx(
        abs(3 / 6 - 0.25)
    )
    logits, target = _case(3, 5)  # N < n_bins
    ece = fastkd.expected_calibration_error(logits, target, 15, binning="adaptive", backend=backend)
    confidence = torch.softmax(logits.double(), -1).amax(-1)
    correct = (logits.argmax(-1) == target).double()
    assert ece == pytest.approx(((correct - confidence).abs().mean()).item(), rel=1e-5)
    assert reference.adaptive_bins(torch.tensor([0.3, 0.3, 0.5, 0.3]), 4).tolist() == [0, 0, 3, 0]


@pytest.mark.parametrize("binning", ["uniform", "adaptive"])
def test_classwise(backend, binning):
    logits, target = _case(120, 6, scale=2.0, ignore_every=9)
    valid = target != -100
    p = torch.softmax(logits[valid].double(), -1)
    y = target[valid]
    per_class = []
    for k in range(6):
        if binning == "uniform":
            per_class.append(binary_calibration_error(p[:, k].cpu().float(), (y == k).long().cpu(), 10).item())
        else:
            bins = reference.adaptive_bins(p[:, k].contiguous(), 10)
            hit = (y == k).double()
            gap = sum((hit[bins == b].sum() - p[bins == b, k].sum()).abs() for b in range(10))
            per_class.append(gap.item() / len(y))
    got = fastkd.expected_calibration_error(logits, target, 10, binning=binning, classwise=True, backend=backend)
    assert got == pytest.approx(sum(per_class) / 6, rel=1e-4)


def test_deterministic(backend):
    logits, target = _case(500, 40, seed=3)
    first = fastkd.calibration_stats(logits, target, backend=backend)
    second = fastkd.calibration_stats(logits, target, backend=backend)
    for a, b in zip(first._fields(), second._fields()):
        assert torch.equal(a, b)


def test_stats_add():
    logits, target = _case(80, 9)
    whole = fastkd.calibration_stats(logits, target, backend="torch")
    parts = fastkd.calibration_stats(logits[:30], target[:30], backend="torch") + fastkd.calibration_stats(
        logits[30:], target[30:], backend="torch"
    )
    assert torch.equal(whole.bin_count, parts.bin_count) and parts.ece() == pytest.approx(whole.ece())
    with pytest.raises(ValueError, match="10 and 15 bins"):
        fastkd.calibration_stats(logits, target, 10, backend="torch") + whole


def _bad(**overrides):
    logits, target = _case(4, 3)
    args = dict(logits=logits, target=target) | overrides
    return args


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(target=torch.zeros(5, dtype=torch.int64)), ValueError, "target must have the logits' shape"),
        (dict(target=torch.tensor([0, 1, 3, 0])), ValueError, "target holds class index 3"),
        (dict(target=torch.zeros(4)), TypeError, "target must hold class indices"),
        (dict(n_bins=0), ValueError, "n_bins must be >= 1"),
        (dict(n_bins=2.5), TypeError, "n_bins must be an int"),
        (dict(norm="l3"), ValueError, "norm must be one of"),
        (dict(binning="quantile"), ValueError, "binning must be one of"),
        (dict(input="probabilities"), ValueError, "input must be one of"),
        (dict(temperature=0.0), ValueError, "temperature must be finite and > 0"),
        (dict(temperature=torch.tensor([1.0, -1.0, 1.0, 1.0])), ValueError, "temperature must be finite and > 0"),
        (dict(logits=torch.zeros(4, 3, dtype=torch.int64)), TypeError, "logits must be a floating-point"),
        (dict(logits=torch.zeros(4, 0)), ValueError, "at least one class"),
        (dict(classwise=1), TypeError, "classwise must be a bool"),
        (dict(logits=torch.full((4, 3), 0.5), input="probs"), ValueError, "a row sums to 1.5"),
        (dict(logits=torch.tensor([[1.5, -0.5, 0.0]] * 4), input="probs"), ValueError, "probabilities in"),
    ],
)
def test_bad_input(overrides, error, match):
    args = _bad(**{k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in overrides.items()})
    with pytest.raises(error, match=match):
        fastkd.expected_calibration_error(**args)


@pytest.mark.parametrize("bad", ["nan", "all_neg_inf"])
@pytest.mark.parametrize("binning, classwise", [("uniform", False), ("adaptive", False), ("uniform", True)])
def test_rows_with_no_distribution_raise(backend, bad, binning, classwise):
    """A counted row that holds NaN (or is all -inf) is named in a ValueError, not turned into a silent
    NaN ECE; an ignored one is skipped; unchecked, the ECE is NaN."""
    logits, target = _case(20, 6, seed=3)
    logits[7] = math.nan if bad == "nan" else -math.inf
    if bad == "nan":
        logits[7, 1:] = 0.0
    kwargs = dict(binning=binning, classwise=classwise, backend=backend)
    with pytest.raises(ValueError, match="logits: row 7 holds NaN or is all -inf"):
        fastkd.expected_calibration_error(logits, target, **kwargs)
    assert math.isnan(fastkd.expected_calibration_error(logits, target, validate_args=False, **kwargs))
    target[7] = -100
    assert math.isfinite(fastkd.expected_calibration_error(logits, target, **kwargs))


def test_probabilities_passed_as_logits_are_refused(backend):
    """Probabilities where logits are expected gave a plausible wrong ECE (0.071 for 0.430) and T (0.57 for
    4.38); now they raise, saying input="probs", and input="probs" gives the right numbers."""
    logits, target = _case(500, 10, scale=4.0, seed=5)
    probs = torch.softmax(logits, -1)
    for fn in (fastkd.expected_calibration_error, fastkd.calibration_stats, fastkd.fit_temperature):
        with pytest.raises(ValueError, match='logits look like probabilities, not logits.*input="probs"'):
            fn(probs, target, backend=backend)
    right = fastkd.expected_calibration_error(logits, target, backend=backend)
    assert fastkd.expected_calibration_error(probs, target, input="probs", backend=backend) == pytest.approx(right, rel=1e-4)
    with pytest.raises(ValueError, match="look like probabilities"):
        fastkd.CalibrationMeter(backend=backend).update(probs, target)
    # Real logits in [0, 1] that do not sum to 1, and unchecked calls, pass.
    fastkd.calibration_stats(torch.rand(8, 10, device=DEVICE), target[:8], backend=backend)
    fastkd.calibration_stats(probs, target, backend=backend, validate_args=False)


@pytest.mark.parametrize("c, n_bins", [(0.9, 10), (0.33, 100), (0.7, 10), (0.6, 5), (0.3, 10), (1 / 3, 3)])
def test_float64_confidences_are_compared_with_the_edges_exactly(c, n_bins):
    """A float64 confidence one rounding from m/M is binned by its exact value (the float64 0.9 lies above
    9/10): the rounded product c * M once equalled the edge and binned it below."""
    c64 = torch.tensor([c], dtype=torch.float64)
    edge = round(c * n_bins)
    above = Fraction(c64.item()) > Fraction(edge, n_bins)
    assert reference.confidence_bins(c64, n_bins).item() == (edge if above else edge - 1)


def test_float64_bin_edges_match_torchmetrics(backend):
    """The issue's four rows: confidences 0.9 (right) and 0.95 (wrong), twice; ECE 0.425 (torchmetrics,
    netcal), not 0.525."""
    p = torch.tensor([[0.9, 0.1], [0.05, 0.95]] * 2, dtype=torch.float64, device=DEVICE)
    y = torch.tensor([0, 0, 0, 0], device=DEVICE)
    tm = multiclass_calibration_error(p.cpu(), y.cpu(), 2, 10).item()
    assert fastkd.expected_calibration_error(p, y, 10, input="probs", backend="torch") == pytest.approx(tm, abs=1e-6)
    assert tm == pytest.approx(0.425)


def test_binary_logits(backend):
    """(N,) logits with 0/1 targets are a binary classifier's: two classes with logits (0, z) (module doc).
    Classwise, they give torchmetrics' binary calibration error (p(class 1) against the target)."""
    g = torch.Generator().manual_seed(8)
    z = (torch.randn(2000, generator=g) * 2).to(DEVICE)
    y = torch.bernoulli(torch.sigmoid(z.cpu() / 1.5), generator=g).long().to(DEVICE)
    two = torch.stack([torch.zeros_like(z), z], -1)
    for t in (1.0, 2.0):
        _assert_stats(fastkd.calibration_stats(z, y, temperature=t, backend=backend), _expected(two, y, 15, t))
    p = torch.sigmoid(z)
    tm = binary_calibration_error(p.cpu(), y.cpu(), n_bins=15).item()
    assert fastkd.expected_calibration_error(z, y, classwise=True, backend=backend) == pytest.approx(tm, rel=1e-4)
    assert fastkd.expected_calibration_error(p, y, classwise=True, input="probs", backend=backend) == pytest.approx(tm, rel=1e-4)
    assert fastkd.fit_temperature(z, y, backend=backend) == pytest.approx(float(fastkd.fit_temperature(two, y)), rel=1e-5)
    batched = fastkd.calibration_stats(z.view(40, 50), y.view(40, 50), backend=backend)
    assert torch.equal(batched.bin_count, fastkd.calibration_stats(z, y, backend=backend).bin_count)
    with pytest.raises(ValueError, match="target holds class index 2"):
        fastkd.calibration_stats(z, y + 1, backend=backend)


def test_single_logit_column_says_what_to_pass(backend):
    """(N, 1) logits with 0/1 targets: the error says a binary logit goes as shape (N,)."""
    with pytest.raises(ValueError, match=r"a single class.*binary classifier.*shape \(4,\)"):
        fastkd.calibration_stats(torch.randn(4, 1, device=DEVICE), torch.tensor([0, 1, 1, 0], device=DEVICE),
                                 backend=backend)  # fmt: skip
