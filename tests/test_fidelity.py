"""fidelity: top-1 agreement and predictive KL against float64 computations."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from conftest import DEVICE, DTYPES

import fastkd
from fastkd import reference

WIDTHS = [1, 2, 10, 1000, 2500]  # 2500: rows read as an aligned body and an edge (bf16, fp16)


def _pair(n, c, k=1, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(k, n, c, generator=g) * scale
    student = teacher[0] * 0.5 + torch.randn(n, c, generator=g) * scale  # agrees on some rows
    return student.to(dtype).to(DEVICE), teacher.to(dtype).to(DEVICE)


def _expected(student, teacher, temperature=1.0):
    teachers = teacher if teacher.dim() == student.dim() + 1 else teacher.unsqueeze(0)
    same, kl = reference.fidelity_rows(student.double(), teachers.double(), temperature)
    return same.double().mean().item(), kl.mean().item()


def _check(got, expected, n):
    agreement, kl = expected
    assert got.count == n
    assert got.top1_agreement == pytest.approx(agreement, abs=1e-12)
    assert got.predictive_kl == pytest.approx(kl, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("members", [1, 3, 8])  # ensemble tiles shrink with the members
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_float64(backend, width, members, dtype):
    student, teacher = _pair(19, width, members, dtype, seed=width)
    teacher_arg = teacher[0] if members == 1 else teacher
    for temperature in (1.0, 4.0):
        got = fastkd.fidelity(student, teacher_arg, temperature, backend=backend)
        _check(got, _expected(student, teacher_arg, temperature), 19)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_with_an_edge(backend, dtype):
    """4097 columns: every row has an edge (at 16-byte vectors, in every dtype), at every offset."""
    student, teacher = _pair(9, 4097, 1, dtype, seed=5)
    for temperature in (1.0, 4.0):
        got = fastkd.fidelity(student, teacher[0], temperature, backend=backend)
        _check(got, _expected(student, teacher[0], temperature), 9)


@pytest.mark.parametrize("members", [1, 2])
def test_top1_ties_across_a_rows_edge(backend, members):
    """The first index of a row's max wins when the tie spans the row's edge and its aligned body: the
    head (columns before the body, which start at a 16-byte boundary) before the body, the body before
    the tail. Rows of 4097 bf16 entries start at every offset mod 8."""
    n, width = 8, 4097
    student, teacher = _pair(n, width, members, torch.bfloat16)
    first, second = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    for r in range(n):
        head = (-r * width) % 8  # columns before row r's aligned body
        first[r], second[r] = (max(head - 1, 0), 100) if r % 2 else (50, width - 1)  # head/body or body/tail
    rows = torch.arange(n)
    student[rows, first], student[rows, second] = 100.0, 100.0
    agree = teacher.clone()
    agree[:, rows, first] = 100.0  # the teachers' top class is the first of the student's tie
    disagree = teacher.clone()
    disagree[:, rows, second] = 100.0
    for members_teacher, want in ((agree, 1.0), (disagree, 0.0)):
        arg = members_teacher[0] if members == 1 else members_teacher
        got = fastkd.fidelity(student, arg, backend=backend)
        assert got.top1_agreement == want
        _check(got, _expected(student, arg), n)


def test_row_temperatures_and_batched_shapes(backend):
    student, teacher = _pair(12, 50)
    temperature = torch.rand(12, device=DEVICE) * 4 + 0.5
    got = fastkd.fidelity(student.view(3, 4, 50), teacher[0].view(3, 4, 50), temperature.view(3, 4), backend=backend)
    _check(got, _expected(student, teacher[0], temperature), 12)
    strided = torch.zeros(12, 80, device=DEVICE)
    strided[:, 3:53] = student
    _check(fastkd.fidelity(strided[:, 3:53], teacher[0], backend=backend), _expected(student, teacher[0]), 12)


def test_identical_models(backend):
    _, teacher = _pair(30, 100)
    got = fastkd.fidelity(teacher[0], teacher[0], 2.0, backend=backend)
    assert got.top1_agreement == 1.0 and abs(got.predictive_kl) < 1e-6


def test_masked_and_extreme_logits(backend):
    student, teacher = _pair(16, 1500, scale=1e4)
    student[:, 100:200] = float("-inf")
    teacher[:, :, 100:200] = float("-inf")  # masked for both: no mass, no KL
    _check(fastkd.fidelity(student, teacher[0], backend=backend), _expected(student, teacher[0]), 16)
    student, teacher = _pair(4, 10)
    student[0, teacher[0, 0].argmax()] = float("-inf")  # the teacher's top class masked by the student
    assert fastkd.fidelity(student, teacher[0], backend=backend).predictive_kl == math.inf


def test_teacher_max_jumping_past_an_infinite_term(backend):
    """A class the student masks gets teacher mass e^-1000 (0 in float64), then the teacher's max jumps
    in a later column block: the term drops out as in float64 instead of making 0 * inf = NaN."""
    student = torch.zeros(2, 2100, device=DEVICE)
    student[:, 0] = float("-inf")
    teacher = torch.zeros(2, 2100, device=DEVICE)
    teacher[:, 2050] = 1000.0
    got = fastkd.fidelity(student, teacher, backend=backend)
    _check(got, _expected(student, teacher), 2)
    assert math.isfinite(got.predictive_kl)


def test_ties_take_the_first_index(backend):
    student = torch.tensor([[1.0, 3.0, 3.0], [2.0, 2.0, 0.0]], device=DEVICE)
    teacher = torch.tensor([[0.0, 5.0, 5.0], [0.0, 1.0, 1.0]], device=DEVICE)  # rows: 1 = 1, 0 != 1
    assert fastkd.fidelity(student, teacher, backend=backend).top1_agreement == 0.5


def test_probs_input(backend):
    student, teacher = _pair(20, 30)
    p_s, p_t = torch.softmax(student, -1), torch.softmax(teacher[0], -1)
    got = fastkd.fidelity(p_s, p_t, 2.0, input="probs", backend=backend)
    _check(got, _expected(student, teacher[0], 2.0), 20)


def test_probs_in_chunks_of_rows(backend, monkeypatch):
    """Probabilities become log-probabilities a chunk of rows at a time: chunks of 3 rows, 3 teachers."""
    module = importlib.import_module("fastkd.fidelity")  # fastkd.fidelity is the function
    monkeypatch.setattr(module, "CHUNK_ELEMENTS", 3 * 4 * 30)
    student, teacher = _pair(20, 30, k=3)
    temperature = torch.rand(20, device=DEVICE) * 3 + 0.5
    got = fastkd.fidelity(torch.softmax(student, -1), torch.softmax(teacher, -1), temperature, input="probs",
                          backend=backend)  # fmt: skip
    _check(got, _expected(student, teacher, temperature), 20)


def test_no_rows(backend):
    student, teacher = _pair(0, 5)
    got = fastkd.fidelity(student, teacher[0], backend=backend)
    assert got.count == 0 and math.isnan(got.top1_agreement)


@pytest.mark.parametrize(
    "student, teacher, kwargs, error, match",
    [
        ((4, 5), (4, 6), {}, ValueError, "share the vocabulary"),
        ((4, 5), (3, 5), {}, ValueError, "teacher_logits must have the student's shape"),
        ((4, 5), (4, 5), dict(temperature=-2.0), ValueError, "temperature must be finite and > 0"),
        ((4, 5), (4, 5), dict(input="scores"), ValueError, "input must be one of"),
        ((4, 5), (4, 5), dict(input="probs"), ValueError, "student_logits: input='probs'"),
    ],
)
def test_bad_input(student, teacher, kwargs, error, match):
    with pytest.raises(error, match=match):
        fastkd.fidelity(torch.randn(student, device=DEVICE), torch.randn(teacher, device=DEVICE), **kwargs)


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_nan_rows_and_probabilities_are_named(backend, which):
    """A NaN row makes the KL NaN: checked, a ValueError names it; probabilities passed as logits raise."""
    student, teacher = _pair(6, 10, seed=40)
    teacher = teacher[0]
    (student if which == "student" else teacher)[4, 2] = math.nan
    with pytest.raises(ValueError, match=f"{which}_logits: row 4 holds NaN"):
        fastkd.fidelity(student, teacher, backend=backend)
    assert math.isnan(fastkd.fidelity(student, teacher, backend=backend, validate_args=False).predictive_kl)
    p, q = (torch.softmax(x, -1) for x in _pair(6, 10, seed=42))
    with pytest.raises(ValueError, match='student_logits look like probabilities.*input="probs"'):
        fastkd.fidelity(p, q, backend=backend)
