"""fit_temperature and TemperatureScaler: the NLL optimum against a brute-force search, and what it does to ECE."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE

import fastkd
from fastkd import reference


def _well_specified(n=3000, c=10, seed=0):
    """Logits z and labels drawn from softmax(z): calibrated by construction (T = 1 is the optimum in
    expectation); z * 3 is then over-confident with optimum near T = 3."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * 2
    y = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(1)
    return z.to(DEVICE), y.to(DEVICE)


def _nll(logits, target, temperature):
    """Mean NLL in float64 of softmax(logits / T)."""
    return reference.temperature_nll_derivatives(logits.double(), target, 1 / temperature)[0].item() / len(target)


def _brute_force(logits, target, low=0.05, high=20.0):
    """argmin over T of the float64 NLL: a grid in log T, then golden-section search."""
    grid = torch.logspace(math.log10(low), math.log10(high), 200).tolist()
    best = min(range(len(grid)), key=lambda i: _nll(logits, target, grid[i]))
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(80):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if _nll(logits, target, c) < _nll(logits, target, d):
            b = d
        else:
            a = c
    return (a + b) / 2


def test_recovers_overconfidence(backend):
    z, y = _well_specified()
    logits = z * 3
    temperature = fastkd.fit_temperature(logits, y, backend=backend)
    assert isinstance(temperature, float) and temperature.converged and temperature.passes <= 10
    assert temperature == pytest.approx(3.0, rel=0.1)
    assert temperature == pytest.approx(_brute_force(logits, y), rel=1e-4)
    assert temperature.nll < temperature.nll_initial
    assert _nll(logits, y, temperature) < _nll(logits, y, 1.0)
    before = fastkd.expected_calibration_error(logits, y, backend=backend)
    after = fastkd.expected_calibration_error(logits, y, temperature=float(temperature), backend=backend)
    assert after < before / 3
    assert abs(temperature.grad) * len(y) < 1e-2  # dNLL/du summed over rows: the optimum's gradient vanishes


@pytest.mark.parametrize("scale, seed", [(0.3, 1), (1.0, 2), (8.0, 3)])
@pytest.mark.parametrize("n_classes", [2, 10, 100])
def test_matches_brute_force(backend, scale, seed, n_classes):
    z, y = _well_specified(400, n_classes, seed)
    logits = z * scale
    temperature = fastkd.fit_temperature(logits, y, backend=backend)
    assert temperature.converged and temperature.passes <= 12
    assert temperature == pytest.approx(_brute_force(logits, y, 0.01, 100), rel=1e-4)


@pytest.mark.parametrize(
    "scale, n_classes, seed, mislabelled",
    [(50.0, 10, 23, 0.0), (300.0, 100, 0, 0.0), (10.0, 2, 16, 0.0), (300.0, 2, 7, 0.1), (100.0, 100, 24, 0.1)],
)
def test_steep_logits_take_at_most_ten_passes(backend, scale, n_classes, seed, mislabelled):
    """The slowest cases of a sweep over 1620 fits (scales 0.05 to 300, C = 2 to 100): a first Newton
    step that overshoots the optimum, then creeps back without the bracket's bisection (14 passes)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(200, n_classes, generator=g, dtype=torch.float64) * scale
    y = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(1)
    flip = torch.rand(200, generator=g) < mislabelled
    y[flip] = torch.randint(0, n_classes, (int(flip.sum()),), generator=g)
    logits, target = z.float().to(DEVICE), y.to(DEVICE)
    temperature = fastkd.fit_temperature(logits, target, backend=backend)
    assert temperature.converged and temperature.passes <= 10
    assert temperature == pytest.approx(_brute_force(logits, target, 0.01, 100), rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(backend, dtype):
    z, y = _well_specified(500)
    logits = (z * 2).to(dtype)
    temperature = fastkd.fit_temperature(logits, y, backend=backend)
    assert temperature == pytest.approx(_brute_force(logits.float(), y), rel=1e-4)


def test_ignored_rows_and_probs(backend):
    z, y = _well_specified(300)
    y_ignored = y.clone()
    y_ignored[::3] = -100
    keep = y_ignored != -100
    got = fastkd.fit_temperature(z * 2, y_ignored, backend=backend)
    assert got == pytest.approx(float(fastkd.fit_temperature(z[keep] * 2, y[keep], backend=backend)), rel=1e-6)
    probs = torch.softmax(z.double() * 2, -1).float()
    from_probs = fastkd.fit_temperature(probs, y, input="probs", backend=backend)
    assert from_probs == pytest.approx(float(fastkd.fit_temperature(z * 2, y, backend=backend)), rel=1e-4)
    probs[::3] = 0.0  # padding rows, ignored: not probabilities, and not checked
    assert fastkd.fit_temperature(probs, y_ignored, input="probs", backend=backend) == pytest.approx(got, rel=1e-4)


def test_optimum_beyond_bounds(backend):
    """Every prediction right by a wide margin: the NLL falls toward 0 as T -> 0, so T is the lower bound."""
    logits = torch.eye(5, device=DEVICE).repeat(20, 1) * 10
    target = torch.arange(5, device=DEVICE).repeat(20)
    with pytest.warns(UserWarning, match=r"optimum lies beyond bounds=\(0.01, 100.0\)"):
        temperature = fastkd.fit_temperature(logits, target, backend=backend)
    assert temperature.at_bound and temperature == pytest.approx(0.01) and temperature.passes <= 12
    assert temperature.nll < 1e-6
    with pytest.warns(UserWarning, match="T = 50 is the bound"):
        wrong = fastkd.fit_temperature(logits, (target + 1) % 5, bounds=(0.1, 50.0), backend=backend)
    assert wrong.at_bound and wrong == pytest.approx(50.0)
    with pytest.warns(UserWarning, match="is the bound, not the optimum"):  # the scaler stores it, warned
        fastkd.TemperatureScaler().fit(logits, target, backend=backend)


def test_single_class_and_single_row(backend):
    assert fastkd.fit_temperature(torch.randn(7, 1, device=DEVICE), torch.zeros(7, dtype=torch.int64, device=DEVICE),
                                  backend=backend) == 1.0  # fmt: skip
    # One row whose target is the middle logit: the NLL is least at u = 0 (uniform), so T is the upper bound.
    with pytest.warns(UserWarning, match="beyond bounds"):
        single = fastkd.fit_temperature(torch.tensor([[1.0, 0.0, -1.0]], device=DEVICE),
                                        torch.tensor([1], device=DEVICE), backend=backend)  # fmt: skip
    assert single.at_bound and single == 100.0 and single.nll < single.nll_initial


def test_temperature_scaler():
    z, y = _well_specified(1000)
    scaler = fastkd.TemperatureScaler().fit(z * 3, y, backend="torch")
    assert float(scaler.temperature) == pytest.approx(float(scaler.fit_result), rel=1e-6)
    logits = torch.randn(4, 10, dtype=torch.bfloat16, device=DEVICE)
    assert torch.equal(scaler(logits), logits / scaler.temperature) and scaler(logits).dtype == torch.bfloat16
    restored = fastkd.TemperatureScaler()
    restored.load_state_dict(scaler.state_dict())
    assert torch.equal(restored.temperature, scaler.temperature)


def test_max_passes_returns_an_evaluated_temperature(backend):
    z, y = _well_specified(500)
    with pytest.warns(UserWarning, match="max_passes=1 ran out before convergence"):
        first = fastkd.fit_temperature(z * 3, y, max_passes=1, backend=backend)
    assert first == 1.0 and not first.converged and first.nll == pytest.approx(_nll(z * 3, y, 1.0), rel=1e-6)


def test_well_calibrated_takes_few_passes(backend):
    z, y = _well_specified(3000, seed=4)
    assert fastkd.fit_temperature(z, y, backend=backend).passes <= 5


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(target=torch.full((6,), -100)), ValueError, "every row is ignore_index"),
        (dict(logits=torch.tensor([[0.0, float("-inf"), 1.0, 2.0, 3.0]] * 6)), ValueError, "the NLL at T = 1 is inf"),
        (dict(bounds=(0.0, 10.0)), ValueError, r"bounds\[0\] must be in"),
        (dict(bounds=(0.1, 0.5)), ValueError, r"bounds\[1\] must be in"),
        (dict(bounds=[0.1, 10.0]), TypeError, "bounds must be a tuple"),
        (dict(max_passes=0), ValueError, "max_passes must be >= 1"),
        (dict(rtol=0.0), ValueError, "rtol must be in"),
        (dict(target=torch.tensor([0, 1, 2, 3, 4, 9])), ValueError, "target holds class index 9"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = dict(logits=torch.randn(6, 5), target=torch.arange(6) % 5) | kwargs
    with pytest.raises(error, match=match):
        fastkd.fit_temperature(args.pop("logits").to(DEVICE), args.pop("target").to(DEVICE), **args)
    with pytest.raises(ValueError, match="temperature must be in"):
        fastkd.TemperatureScaler(temperature=-1.0)
