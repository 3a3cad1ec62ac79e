"""The fused distillation loss: every backend against float64, the loss and the gradient wrt the student."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, DTYPES, assert_close
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import fastkd
from fastkd import reference

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]
NORMS = [None, "standardize", "spherical"]
WIDTHS = [1, 10, 1000, 4097, 32000, 70001]  # one block; the column loop; over 65536


def logits(*shape, dtype=torch.float32, seed=0, scale=3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=gen)).to(DEVICE, dtype)


def targets(rows, n_classes, seed=0, ignored=(1,)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, n_classes, rows if isinstance(rows, tuple) else (rows,), generator=gen)
    for i in ignored:
        if i < y.numel():
            y.view(-1)[i] = -100
    return y.to(DEVICE)


def loss_of(x, teacher, target, backend, **options):
    """``fastkd.kd_loss`` on ``backend``, or with backend "reference" the float64 oracle
    ``reference.kd_loss`` (autograd: an implementation independent of every backend's)."""
    if backend != "reference":
        return fastkd.kd_loss(x, teacher, target, backend=backend, **options)
    options = {k: v for k, v in options.items() if k not in ("inplace_grad", "validate_args", "values_are")}
    if options.get("tail") is None:
        options.pop("tail", None)
    return reference.kd_loss(x, teacher, target, **options)


def run(student, teacher, target=None, backend="torch", **options):
    """(loss, dL/d student) with L = 2 * loss, or sum(w * loss) with random w for reduction "none"."""
    x = student.detach().clone().requires_grad_()
    loss = loss_of(x, teacher, target, backend, **options)
    if loss.dim():
        weights = logits(*loss.shape, dtype=loss.dtype, seed=7, scale=1.0)
        (loss * weights).sum().backward()
    else:
        (2 * loss).backward()
    return loss.detach(), x.grad


def exact(student, teacher, target=None, **options):
    """``run`` by the reference in float64 on the same (rounded) inputs (a sparse teacher's values too)."""
    for key in ("temperature", "teacher_temperature"):
        if isinstance(options.get(key), torch.Tensor):
            options[key] = options[key].double()
    if "teacher_topk" in options:
        options["teacher_topk"] = (options["teacher_topk"][0], options["teacher_topk"][1].double())
    return run(student.double(), None if teacher is None else teacher.double(), target, "reference", **options)


def finite_max(x: torch.Tensor) -> float:
    return x.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).abs().max().item() if x.numel() else 0.0


def row_weight(student, target, reduction="mean", **_) -> float:
    """The largest dL/d(row loss) in ``run``: the size of the terms that cancel in dL/dx (each entry's
    CE and KD terms are at most about 1 times this), the tolerance's scale where dL/dx is near 0."""
    if reduction == "none":
        return logits(*student.shape[:-1], seed=7, scale=1.0).abs().max().item() if student.numel() else 0.0
    rows = student.shape[:-1].numel()
    if reduction == "mean" and target is not None:
        rows = (target != -100).sum().item()
    return 2.0 / max(rows, 1) if reduction in ("mean", "batchmean") else 2.0


def check(student, teacher, target=None, backend="torch", **options):
    """Loss and gradient of ``backend`` within the dtype's tolerance of float64; returns them."""
    loss, grad = run(student, teacher, target, backend, **options)
    want_loss, want_grad = exact(student, teacher, target, **options)
    assert loss.dtype == reference.compute_dtype(student.dtype) and grad.dtype == student.dtype
    assert grad.shape == student.shape
    # The loss is a difference of terms of about 1 per row (lse - x_y, for one), and dL/dx of terms of
    # about dL/d(row loss): their tolerances are relative to those sizes, plus twice the error of the
    # reference in float32 (a KL between close distributions keeps the float32 error of the row's
    # log-sum-exps; normalizing a nearly constant row amplifies the rounding of x - mean).
    rows = student.shape[:-1].numel() if options.get("reduction") == "sum" else 1
    base_loss, base_grad = run(student, teacher, target, "torch", **options) if backend != "torch" else (None, None)
    assert_close(loss, want_loss, student.dtype, scale=max(finite_max(want_loss), rows), baseline=base_loss)
    grad_scale = max(finite_max(want_grad), row_weight(student, target, **options))
    assert_close(grad, want_grad, student.dtype, scale=grad_scale, baseline=base_grad)
    return loss, grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_teachers", [1, 3])
@pytest.mark.parametrize("logit_norm", NORMS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_divergences_and_normalizations(backend, divergence, logit_norm, n_teachers, dtype):
    shape = (n_teachers, 6, 1000) if n_teachers > 1 else (6, 1000)
    student, teacher = logits(6, 1000, dtype=dtype), logits(*shape, dtype=dtype, seed=1)
    check(student, teacher, targets(6, 1000), backend, temperature=2.0, alpha=0.7, divergence=divergence,
          logit_norm=logit_norm, beta=0.3)  # fmt: skip


@pytest.mark.parametrize("logit_norm", NORMS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("width", WIDTHS)
def test_widths(backend, width, divergence, logit_norm):
    student, teacher = logits(3, width), logits(3, width, seed=1)
    check(student, teacher, targets(3, width), backend, temperature=4.0, divergence=divergence,
          logit_norm=logit_norm, label_smoothing=0.1)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", WIDTHS)
def test_widths_by_dtype(backend, width, dtype):
    student, teacher = logits(3, width, dtype=dtype), logits(2, 3, width, dtype=dtype, seed=1)
    check(student, teacher, targets(3, width), backend, temperature=2.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [1, 7, 1000, 4097, 5003])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0, 4.0, 8.0, 3.5, "per_row"])
def test_forward_kl_ce_temperatures(backend, temperature, width, dtype):
    """Forward KL + CE (label smoothing) where the Triton kernel takes CE's exps e^(x - max x) as the
    T-th powers of the student's e^((x - max x) / T) (T an integer in [1, 8]) and where CE takes its
    own (T = 3.5; a per-row tensor of 1, 2, 4, 3.5): one block (1, 7, 1000) and the column loop (4097,
    5003: rows with an edge), against float64."""
    student, teacher = logits(4, width, dtype=dtype), logits(4, width, dtype=dtype, seed=1)
    t = torch.tensor([1.0, 2.0, 4.0, 3.5], device=DEVICE) if temperature == "per_row" else temperature
    check(student, teacher, targets(4, width), backend, temperature=t, label_smoothing=0.1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [1000, 5003])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0, 4.0, 8.0])
def test_integer_temperature_as_a_tensor(backend, temperature, width, dtype):
    """An integer temperature as a number (the Triton kernel: CE's exps as powers of the student's, a
    relative error of about T ulp) and as a per-row tensor of the same value (CE's own exps): the same
    loss (within float32's tolerance) and gradient (within the dtype's)."""
    student, teacher, target = logits(4, width, dtype=dtype), logits(4, width, dtype=dtype, seed=1), targets(4, width)
    options = {"label_smoothing": 0.1, "reduction": "none"}
    loss, grad = run(student, teacher, target, backend, temperature=temperature, **options)
    want_loss, want_grad = run(student, teacher, target, backend, temperature=torch.full((4,), temperature,
                               device=DEVICE), **options)  # fmt: skip
    assert_close(loss, want_loss.double(), torch.float32)
    assert_close(grad, want_grad.double(), dtype, scale=max(finite_max(want_grad), row_weight(student, target,
                 **options)))  # fmt: skip


def test_ce_power_rule():
    """The Triton kernel's CE_POW: T for one number T that is an integer in [1, 8], with KD and CE and no
    logit_norm; else 0 (CE's own exps)."""
    from fastkd.kernels.kd_loss import ce_power

    assert [ce_power(t, None, True, True) for t in (1.0, 2, 3.0, 4.0, 8.0)] == [1, 2, 3, 4, 8]
    assert [ce_power(t, None, True, True) for t in (3.5, 0.5, 9.0, 16.0, 1.0 + 1e-7)] == [0] * 5
    assert ce_power(torch.tensor(4.0), None, True, True) == 0 and ce_power(torch.full((3,), 4.0), None, True, True) == 0
    assert ce_power(4.0, "standardize", True, True) == 0 and ce_power(4.0, "spherical", True, True) == 0
    assert ce_power(4.0, None, False, True) == 0 and ce_power(4.0, None, True, False) == 0


@pytest.mark.parametrize("temperature", [4.0, 3.5])
@pytest.mark.parametrize("width", [10, 4097])
def test_nan_student_logit_gives_a_nan_row(backend, temperature, width):
    """NaN in, NaN out through the student's exps and CE's (powers of them at T = 4, their own at 3.5)."""
    student, teacher = logits(3, width, seed=60), logits(3, width, seed=61)
    student[1, 3] = math.nan
    target = torch.tensor([1, 2, 3], device=DEVICE)
    loss, grad = run(student, teacher, target, backend, temperature=temperature, reduction="none")
    assert loss[1].isnan() and not loss[[0, 2]].isnan().any()
    assert grad[1].isnan().any() and not grad[[0, 2]].isnan().any()


@pytest.mark.parametrize(
    "options",
    [
        dict(temperature_squared=False, temperature=4.0),
        dict(teacher_temperature=1.5, temperature=3.0),
        dict(alpha=0.0),
        dict(alpha=1.0),
        dict(label_smoothing=0.2, alpha=0.3),
        dict(reduction="sum"),
        dict(reduction="batchmean"),
        dict(reduction="none"),
        dict(logit_norm="spherical", norm_scale=5.0),
        dict(divergence="jsd", beta=0.9, temperature=0.5),
    ],
    ids=str,
)
def test_options(backend, options):
    student, teacher = logits(2, 3, 51), logits(2, 3, 51, seed=1)
    check(student, teacher, targets((2, 3), 51, ignored=(0, 4)), backend, **options)


@pytest.mark.parametrize("per_row", [False, True])
def test_tensor_temperatures(backend, per_row):
    student, teacher = logits(5, 40), logits(5, 40, seed=1)
    shape = (5,) if per_row else ()
    t = torch.rand(shape, device=DEVICE) * 3 + 0.5
    t_t = torch.rand(shape, device=DEVICE) * 3 + 0.5
    check(student, teacher, targets(5, 40), backend, temperature=t, teacher_temperature=t_t, alpha=0.6)
    # The same per-row temperatures as floats, row by row.
    rows = [run(student[i : i + 1], teacher[i : i + 1], targets(5, 40)[i : i + 1], backend, reduction="sum",
                temperature=float(t.reshape(-1)[i if per_row else 0]),
                teacher_temperature=float(t_t.reshape(-1)[i if per_row else 0]), alpha=0.6)[0]
            for i in range(5)]  # fmt: skip
    loss, _ = run(student, teacher, targets(5, 40), backend, temperature=t, teacher_temperature=t_t, alpha=0.6,
                  reduction="sum")  # fmt: skip
    assert_close(loss, torch.stack(rows).sum(), torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
def test_all_rows_ignored(backend, reduction):
    student, teacher = logits(4, 33), logits(4, 33, seed=1)
    target = torch.full((4,), -100, device=DEVICE)
    loss, grad = run(student, teacher, target, backend, reduction=reduction)
    assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(grad, torch.zeros_like(grad))


def test_ignored_rows_are_absent(backend):
    """The mean is over the rows not ignored; ignored rows get no gradient; at V > 65536 too."""
    student, teacher = logits(4, 70001), logits(4, 70001, seed=1)
    target = targets(4, 70001, ignored=(1, 2))
    loss, grad = check(student, teacher, target, backend, temperature=2.0)
    kept, kept_grad = run(student[[0, 3]], teacher[[0, 3]], target[[0, 3]], backend, temperature=2.0)
    assert_close(loss, kept.double(), torch.float32)
    assert torch.equal(grad[[1, 2]], torch.zeros_like(grad[[1, 2]]))
    assert_close(grad[[0, 3]], kept_grad.double(), torch.float32)


def test_pure_distillation(backend):
    student, teacher = logits(2, 3, 300), logits(2, 3, 300, seed=1)
    check(student, teacher, None, backend, alpha=1.0, temperature=4.0)


@pytest.mark.parametrize("width", [40, 5000])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_classes(backend, divergence, width):
    """-inf logits (a masked vocabulary) in both, or in the teacher only (where reverse KL is infinite,
    as p_s > 0 = p_t there): probability 0, no gradient."""
    student, teacher = logits(4, width), logits(4, width, seed=1)
    student[:, ::7] = float("-inf")
    teacher[:, ::7] = float("-inf")
    if divergence != "reverse_kl":
        teacher[:, 1::9] = float("-inf")
    target = targets(4, width)
    target = torch.where(target % 7 == 0, target + 1, target)  # no target on a masked class (CE = inf)
    loss, grad = check(student, teacher, target, backend, divergence=divergence, temperature=2.0,
                       logit_norm="standardize")  # fmt: skip
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_teacher_mass_on_a_masked_student_class_is_infinite(backend):
    student, teacher = logits(2, 30), logits(2, 30, seed=1)
    student[:, 3] = float("-inf")
    loss, _ = check(student, teacher, None, backend, alpha=1.0)
    assert loss.item() == math.inf


@pytest.mark.parametrize("width", [100, 5000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_logits(backend, dtype, width):
    student = logits(4, width, dtype=dtype, scale=1.0) * 1e4
    teacher = logits(4, width, dtype=dtype, seed=1, scale=1.0) * 1e4
    for divergence in DIVERGENCES:
        check(student, teacher, targets(4, width), backend, divergence=divergence, temperature=5000.0)
        check(student, teacher, targets(4, width), backend, divergence=divergence, logit_norm="spherical")


@pytest.mark.parametrize("width", [300, 5000])
@pytest.mark.parametrize("logit_norm", ["standardize", "spherical"])
def test_nearly_constant_rows(backend, logit_norm, width):
    """Normalizing a row whose logits differ by ~1e-3 scales them by ~1e3: the gradient's terms grow by
    that factor and cancel, and must cancel to float32 accuracy (the test needs the mean of the chain
    rule's gradient taken off, as autograd does, not assumed 0)."""
    student = logits(4, width, scale=1e-3) + logits(4, 1, seed=3)
    teacher = logits(4, width, seed=1, scale=1e-2) - 2.0
    for divergence in DIVERGENCES:
        check(student, teacher, targets(4, width), backend, alpha=1.0, temperature=2.0, divergence=divergence,
              logit_norm=logit_norm)  # fmt: skip


@pytest.mark.parametrize("width", [100, 4000])
def test_jsd_with_underflowing_probabilities(backend, width):
    """Logits spread over +-60: many student probabilities are float32 denormals or 0; the mixture m
    is formed in log space, so no row turns NaN."""
    student = logits(8, width, scale=20.0)
    teacher = student + logits(8, width, seed=1, scale=1.0)
    loss, grad = check(student, teacher, None, backend, alpha=1.0, divergence="jsd", reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


def test_widest_rows(backend):
    """The widest rows the issue names, 262144 classes (the column loop, and x_y past 2^17)."""
    student, teacher = logits(2, 262144), logits(2, 262144, seed=1)
    check(student, teacher, torch.tensor([262143, 5], device=DEVICE), backend, temperature=2.0)


def test_shift_invariance(backend):
    """Adding a constant to a row of logits changes neither the loss nor the gradient."""
    student, teacher, target = logits(4, 300), logits(4, 300, seed=1), targets(4, 300)
    base = run(student, teacher, target, backend, temperature=2.0, label_smoothing=0.1, logit_norm="standardize")
    shifted = run(student + 100, teacher - 50, target, backend, temperature=2.0, label_smoothing=0.1,
                  logit_norm="standardize")  # fmt: skip
    assert_close(shifted[0], base[0].double(), torch.float32)
    assert_close(shifted[1], base[1].double(), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_sequence_and_strides(backend, dtype):
    """(B, S, V) logits, a non-contiguous student (a slice), a teacher with the classes not last in memory."""
    student = logits(3, 5, 260, dtype=dtype)[:, :, :257]
    teacher = logits(3, 5, 257, dtype=dtype, seed=1).transpose(0, 1).contiguous().transpose(0, 1)
    target = targets((3, 5), 257, ignored=(2, 7))
    loss, grad = check(student, teacher, target, backend, temperature=3.0, reduction="none")
    assert loss.shape == (3, 5)
    ensemble = torch.stack([teacher, logits(3, 5, 257, dtype=dtype, seed=2)]).transpose(2, 3).contiguous()
    check(student, ensemble.transpose(2, 3), target, backend, temperature=3.0)


def test_strided_target_and_temperature(backend):
    """A target and a per-row temperature that are columns of larger tensors (strided)."""
    student, teacher = logits(6, 50), logits(6, 50, seed=1)
    target = torch.randint(0, 50, (6, 3), generator=torch.Generator().manual_seed(0)).to(DEVICE)[:, 1]
    t = (torch.rand(6, 4, device=DEVICE) + 0.5)[:, 2]
    got = check(student, teacher, target, backend, temperature=t, reduction="none")
    want = run(student, teacher, target.contiguous(), backend, temperature=t.contiguous(), reduction="none")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_float16_gradient_keeps_small_entries_under_a_grad_scaler(backend):
    """A float16 gradient is stored before the mean's 1/rows, which the backward applies with dL/dloss
    (a GradScaler's 2^12 here): entries that 1/rows alone would round to 0 survive."""
    student, teacher = logits(2048, 300, dtype=torch.float16), logits(2048, 300, dtype=torch.float16, seed=1)
    target = targets(2048, 300)
    x = student.clone().requires_grad_()
    fastkd.kd_loss(x, teacher, target, temperature=2.0, backend=backend).backward(torch.tensor(4096.0, device=DEVICE))
    xd = student.double().requires_grad_()
    reference.kd_loss(xd, teacher.double(), target, temperature=2.0).backward(torch.tensor(4096.0, dtype=torch.float64))
    assert_close(x.grad, xd.grad, torch.float16)
    # As many zeros as the exact gradient rounded to float16 (306 of 614400), give or take the entries
    # below float16's smallest number before dL/dloss (313); scaled by 1/rows first, 24% were 0.
    assert (x.grad == 0).sum() <= 2 * (xd.grad.half() == 0).sum()


def test_no_gradient_is_written_without_autograd(backend):
    """Under no_grad (evaluation), inplace_grad leaves the logits alone and the loss is the same."""
    student, teacher, target = logits(4, 300), logits(4, 300, seed=1), targets(4, 300)
    x = student.clone()
    with torch.no_grad():
        loss = fastkd.kd_loss(x, teacher, target, inplace_grad=True, backend=backend)
    assert torch.equal(x, student)
    assert_close(loss, fastkd.kd_loss(student.double(), teacher.double(), target).detach(), torch.float32)


def test_ignored_rows_of_masked_logits(backend):
    """A padding row whose logits are all -inf and whose target is ignored: no loss, zero gradient."""
    student, teacher, target = logits(3, 20), logits(3, 20, seed=1), targets(3, 20, ignored=(1,))
    student[1] = float("-inf")
    teacher[1] = float("-inf")
    loss, grad = check(student, teacher, target, backend, logit_norm="standardize", divergence="jsd")
    assert torch.isfinite(loss) and torch.equal(grad[1], torch.zeros_like(grad[1]))


def test_one_row_one_class_and_empty(backend):
    check(logits(1, 20), logits(1, 20, seed=1), targets(1, 20, ignored=()), backend)
    loss, grad = check(logits(5, 1), logits(5, 1, seed=1), targets(5, 1), backend, temperature=2.0)
    assert loss.item() == 0 and torch.equal(grad, torch.zeros_like(grad))
    for reduction in ("mean", "sum", "none"):
        loss, grad = run(logits(0, 20), logits(0, 20), targets(0, 20), backend, reduction=reduction)
        assert loss.numel() == (0 if reduction == "none" else 1) and grad.shape == (0, 20)
        assert not loss.any()


def test_ensemble_is_the_mean_distribution():
    """K = 3 teachers act as one teacher whose probabilities are the members' mean."""
    student, teachers = logits(4, 50).double(), logits(3, 4, 50, seed=1).double()
    mean_probs = torch.softmax(teachers / 2.0, -1).mean(0)
    got = reference.kd_loss(student, teachers, temperature=2.0, alpha=1.0, reduction="none")
    want = (mean_probs * (mean_probs.log() - torch.log_softmax(student / 2.0, -1))).sum(-1) * 4.0
    torch.testing.assert_close(got, want)


def test_reference_matches_pytorch():
    """The reference's terms against torch's own kl_div, cross_entropy, std and normalize."""
    s, t, y = logits(6, 40).double(), logits(6, 40, seed=1).double(), targets(6, 40, ignored=())
    kl = F.kl_div(torch.log_softmax(s / 3, -1), torch.log_softmax(t / 3, -1), log_target=True, reduction="none")
    options = dict(temperature=3.0, alpha=1.0, reduction="none")
    torch.testing.assert_close(reference.kd_loss(s, t, **options), 9 * kl.sum(-1))
    reverse = F.kl_div(torch.log_softmax(t / 3, -1), torch.log_softmax(s / 3, -1), log_target=True, reduction="none")
    torch.testing.assert_close(reference.kd_loss(s, t, divergence="reverse_kl", **options), 9 * reverse.sum(-1))
    ce = F.cross_entropy(s, y, label_smoothing=0.2, reduction="none")
    torch.testing.assert_close(reference.kd_loss(s, t, y, alpha=0.0, label_smoothing=0.2, reduction="none"), ce)
    std = (s - s.mean(-1, keepdim=True)) / (s.std(-1, keepdim=True) + 1e-7)
    torch.testing.assert_close(reference.normalize_logits(s, "standardize"), std)
    sph = 2 * F.normalize(s - s.mean(-1, keepdim=True), dim=-1, eps=0)
    torch.testing.assert_close(reference.normalize_logits(s, "spherical"), sph, rtol=1e-6, atol=1e-6)
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    m = 0.3 * p + 0.7 * q
    jsd = 0.3 * (p * (p / m).log()).sum(-1) + 0.7 * (q * (q / m).log()).sum(-1)
    got = reference.kd_loss(s, t, alpha=1.0, divergence="jsd", beta=0.3, reduction="none")
    torch.testing.assert_close(got, jsd)


def test_teacher_temperature_scales_only_the_teacher():
    s, t = logits(4, 30).double(), logits(4, 30, seed=1).double()
    got = reference.kd_loss(s, t, temperature=2.0, teacher_temperature=4.0, alpha=1.0)
    torch.testing.assert_close(got, reference.kd_loss(s, t / 2, temperature=2.0, alpha=1.0))


def test_inplace_grad(backend):
    """The gradient written into the student logits equals the out-of-place one."""
    student, teacher, target = logits(4, 5000), logits(4, 5000, seed=1), targets(4, 5000)
    want_loss, want_grad = run(student, teacher, target, backend, temperature=2.0)
    x = student.clone().requires_grad_()
    buffer = x * 1.0  # a non-leaf buffer the loss may overwrite
    loss = fastkd.kd_loss(buffer, teacher, target, temperature=2.0, inplace_grad=True, backend=backend)
    (2 * loss).backward()
    assert torch.equal(loss, want_loss) and torch.equal(x.grad, want_grad)
    if backend == "triton":
        assert torch.equal(buffer.detach(), want_grad)  # overwritten with the gradient, scaled in backward


def test_inplace_grad_refuses_unsafe_buffers():
    leaf = logits(4, 50).requires_grad_()
    with pytest.raises(ValueError, match="overwrite a leaf that requires grad"):
        fastkd.kd_loss(leaf, logits(4, 50, seed=1), targets(4, 50), inplace_grad=True, backend="triton")
    expanded = (logits(1, 50).requires_grad_() * 1.0).expand(4, 50)  # rows share memory
    with pytest.raises(ValueError, match="do not overlap"):
        fastkd.kd_loss(expanded, logits(4, 50, seed=1), targets(4, 50), inplace_grad=True, backend="triton")


def test_inplace_grad_fails_a_backward_that_needs_the_logits():
    x = logits(4, 50).requires_grad_()
    buffer = x * 1.0
    other = buffer.sin()  # saves buffer for its backward
    loss = fastkd.kd_loss(buffer, logits(4, 50, seed=1), targets(4, 50), inplace_grad=True, backend="triton")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other.sum()).backward()


def test_backward_runs_once(backend):
    """The same autograd contract on every backend (the reference once allowed a second backward and
    a second derivative where the kernels raised): one backward per forward, no second derivative."""
    x = logits(4, 50).requires_grad_()
    loss = fastkd.kd_loss(x, logits(4, 50, seed=1), targets(4, 50), backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        loss.backward()
    x = logits(4, 50).requires_grad_()
    (dx,) = torch.autograd.grad(fastkd.kd_loss(x, logits(4, 50, seed=1), targets(4, 50), backend=backend), x,
                                create_graph=True)  # fmt: skip
    with pytest.raises(RuntimeError, match="kd_loss has no second derivative"):
        dx.sum().backward()


def test_kd_loss_module():
    student, teacher, target = logits(4, 50), logits(4, 50, seed=1), targets(4, 50)
    t = torch.tensor(3.0, device=DEVICE)
    module = fastkd.KDLoss(temperature=t, alpha=0.9, divergence="jsd", backend="triton")
    assert "temperature" in dict(module.named_buffers())
    want = fastkd.kd_loss(student, teacher, target, temperature=3.0, alpha=0.9, divergence="jsd")
    assert_close(module(student, teacher, target), want.double(), torch.float32)


def _models(seed):
    torch.manual_seed(seed)
    teacher = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    student = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 10))
    return teacher.to(DEVICE), student.to(DEVICE)


def _train(backend, steps=8, compile=False, reduction="mean"):
    teacher, student = _models(0)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    loss_fn = fastkd.KDLoss(temperature=4.0, alpha=0.9, backend=backend, reduction=reduction)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=gen).to(DEVICE)
    y = torch.randint(0, 10, (64,), generator=gen).to(DEVICE)

    def forward(x, y):
        with torch.no_grad():
            teacher_logits = teacher(x)
        return loss_fn(student(x), teacher_logits, y).mean()

    forward = torch.compile(forward, fullgraph=True) if compile else forward
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = forward(x, y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, student


def test_training_loop_lowers_the_loss_and_matches_the_reference():
    losses, student = _train("triton")
    ref_losses, ref_student = _train("torch")
    assert losses[-1] < 0.8 * losses[0]
    torch.testing.assert_close(losses, ref_losses, rtol=1e-4, atol=1e-6)
    for p, q in zip(student.parameters(), ref_student.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_training_step_matches_eager(reduction):
    """torch.compile(fullgraph=True) traces KDLoss (no graph break) and gives the eager losses."""
    torch._dynamo.reset()
    losses, _ = _train("triton", steps=3, compile=True, reduction=reduction)
    eager, _ = _train("triton", steps=3, reduction=reduction)
    torch.testing.assert_close(losses, eager, rtol=1e-5, atol=1e-6)


def test_opcheck(backend):
    from fastkd._ops import _kd_fwd_op
    from fastkd._options import KDOptions

    s, t, y = logits(4, 37), logits(1, 4, 37, seed=1), targets(4, 37)
    per_row = torch.rand(4, device=DEVICE) + 0.5
    for target, options, need_grad in [
        (y, KDOptions.checked(temperature=2.0), True),
        (None, KDOptions.checked(temperature=per_row, alpha=1.0, divergence="jsd", beta=0.3, reduction="none",
                                 temperature_squared=False, logit_norm="spherical", norm_scale=3.0,
                                 label_smoothing=0.1), False),
    ]:  # fmt: skip
        args = (s, t, target, *options.bind(s, target, check_values=True).to_op(), backend, need_grad, False)
        torch.library.opcheck(_kd_fwd_op, args, test_utils=("test_schema", "test_faketensor"))


# Every divergence of fastkd._options.DIVERGENCES with its parameters: JSD's beta, the skew, the alpha-beta
# divergence's (a, b) on a grid (its general form divides by a b: a b near 0 but not 0 is ill-conditioned
# in any precision; b = 0 and a = 0 are its own limits), DKD's weights.
AB_GRID = [0.0, 0.2, 0.5, 1.0, 1.5]
OBJECTIVE = st.one_of(
    st.sampled_from([{"divergence": "forward_kl"}, {"divergence": "reverse_kl"}, {"divergence": "tvd"}]),
    st.builds(lambda beta: {"divergence": "jsd", "beta": beta}, st.floats(0.05, 0.95)),
    st.builds(lambda kind, skew: {"divergence": kind, "skew": skew}, st.sampled_from(["skew_kl", "skew_reverse_kl"]),
              st.floats(0.0, 0.9)),  # fmt: skip
    st.builds(lambda a, b: {"divergence": "ab", "ab_alpha": a, "ab_beta": b}, st.sampled_from(AB_GRID),
              st.sampled_from(AB_GRID)).filter(lambda o: o["ab_alpha"] or o["ab_beta"]),  # fmt: skip
    st.builds(lambda a, b: {"divergence": "dkd", "dkd_alpha": a, "dkd_beta": b}, st.floats(0.0, 2.0),
              st.floats(0.0, 10.0)),  # fmt: skip
)


@settings(derandomize=True)  # the same examples in every run: CI's verdict is the one seen before landing
@given(
    n_rows=st.integers(1, 6),
    width=st.sampled_from([1, 2, 3, 17, 100, 257, 4096, 4100]),
    n_teachers=st.sampled_from([0, 1, 2]),
    temperature=st.floats(0.25, 8.0),
    alpha=st.floats(0.0, 1.0),
    objective=OBJECTIVE,
    logit_norm=st.sampled_from(NORMS),
    reduction=st.sampled_from(["mean", "sum", "batchmean", "none"]),
    label_smoothing=st.sampled_from([0.0, 0.1]),
    seed=st.integers(0, 2**16),
)
def test_random_problems(n_rows, width, n_teachers, temperature, alpha, objective, logit_norm, reduction,
                         label_smoothing, seed):  # fmt: skip
    # Left out: two classes standardized are +-1/sqrt(2) whatever the logits, so the exact gradient through
    # logit_norm is 0 and no tolerance scales with the gradient. Triton's DKD takes the normalization's row
    # sums from closed forms (kernels/kd_loss.py's _dkd_norm_sums), equal to the sums of its per-entry terms
    # up to float32 rounding (6e-8 there); the backward multiplies that by 1/std: 2.1e-5 against a tolerance
    # of 2e-5 at seed 56 (logits -3.9844, -3.9803; T = 0.5), 2e-8 of the gradient's scale k_s / std.
    assume(not (objective["divergence"] == "dkd" and logit_norm is not None and width == 2))
    teacher_shape = (n_teachers, n_rows, width) if n_teachers else (n_rows, width)
    student, teacher = logits(n_rows, width, seed=seed), logits(*teacher_shape, seed=seed + 1)
    check(student, teacher, targets(n_rows, width, seed=seed), "triton", temperature=temperature, alpha=alpha,
          logit_norm=logit_norm, reduction=reduction, label_smoothing=label_smoothing, **objective)  # fmt: skip


# Bad input: each raises before any kernel runs, naming the argument.
S, T_, Y = logits(4, 10), logits(4, 10, seed=1), targets(4, 10)


@pytest.mark.parametrize(
    "args, options, error, match",
    [
        ((S, logits(4, 11), Y), {}, ValueError, "teacher_logits have 11 classes but student_logits have 10"),
        ((S, logits(5, 10), Y), {}, ValueError, "teacher_logits must have the student's shape"),
        ((S, logits(0, 4, 10), Y), {}, ValueError, "teacher_logits must have the student's shape"),
        ((S, T_, Y.float()), {}, TypeError, "target must hold class indices"),
        ((S, T_, Y[:3]), {}, ValueError, "target must have the logits' shape"),
        ((S, T_, torch.tensor([0, 1, 10, 2], device=DEVICE)), {}, ValueError, "class index 10, outside"),
        ((S, T_, torch.tensor([0, -1, 3, 2], device=DEVICE)), {}, ValueError, "class index -1, outside"),
        ((S, T_, Y), dict(temperature=0.0), ValueError, "temperature must be finite and > 0"),
        ((S, T_, Y), dict(temperature=torch.tensor(-1.0)), ValueError, "temperature must be finite and > 0"),
        ((S, T_, Y), dict(teacher_temperature=-2.0), ValueError, "teacher_temperature must be finite and > 0"),
        ((S, T_, Y), dict(temperature=torch.tensor(2.0, requires_grad=True)), ValueError, "does not differentiate"),
        ((S, T_, Y), dict(alpha=1.5), ValueError, r"alpha must be in \[0.0, 1.0\]"),
        ((S, T_, Y), dict(alpha=-0.1), ValueError, "alpha must be in"),
        ((S, T_, Y), dict(divergence="jsd", beta=1.0), ValueError, r"beta=1.0 is an end of JSD's \(0, 1\).*'reverse_kl'"),
        ((S, T_, Y), dict(divergence="jsd", beta=0.0), ValueError, "beta=0.0 is an end of JSD's.*'forward_kl'"),
        ((S, T_, Y), dict(divergence="kl"), ValueError, "divergence must be one of"),
        ((S, T_, Y), dict(reduction="avg"), ValueError, "reduction must be one of"),
        ((S, T_, Y), dict(logit_norm="zscore"), ValueError, "logit_norm must be one of"),
        ((S, T_, Y), dict(norm_scale=3.0), ValueError, "norm_scale applies to logit_norm='spherical'"),
        ((S, T_, Y), dict(logit_norm="spherical", norm_scale=0.0), ValueError, "norm_scale must be in"),
        ((S, T_, Y), dict(label_smoothing=1.2), ValueError, "label_smoothing must be in"),
        ((S, T_, None), dict(alpha=0.5), ValueError, "target=None .* needs alpha=1"),
        ((S.long(), T_, Y), {}, TypeError, "student_logits must be a floating-point tensor"),
        ((S, "teacher", Y), {}, TypeError, "teacher_logits must be a torch.Tensor"),
        ((S[:, :0], T_[:, :0], Y), {}, ValueError, "student_logits must have at least one class"),
        ((S, T_, Y), dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
        ((S, T_, Y), dict(temperature_squared="yes"), TypeError, "temperature_squared must be a bool"),
        ((S.t(), T_.t(), targets(10, 4)), dict(inplace_grad=True, backend="triton"), ValueError, "inplace_grad"),
    ],
)
def test_bad_input(args, options, error, match):
    with pytest.raises(error, match=match):
        fastkd.kd_loss(*args, **options)


def test_unchecked_out_of_range_target_gives_nan(backend):
    """validate_args=False skips the target check; a target outside [0, V) then gives a NaN row, not a
    wrong number (or a device-side assert)."""
    target = torch.tensor([0, 12, 3, -100], device=DEVICE)
    loss, grad = run(S, T_, target, backend, validate_args=False, reduction="none")
    assert loss[1].isnan() and not loss[[0, 2, 3]].isnan().any()
    if backend == "triton":
        assert grad[1].isnan().all() and not grad[[0, 2, 3]].isnan().any()


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("width", [10, 4097])
def test_nan_teacher_logit_gives_a_nan_row(backend, divergence, width):
    """NaN in, NaN out: a NaN teacher logit makes its row's loss and gradient NaN on every backend (the
    p > 0 guard of the divergence once read NaN as 0 and dropped the KD term)."""
    student, teacher = logits(3, width, seed=60), logits(3, width, seed=61)
    teacher[1, 0] = math.nan
    target = torch.tensor([1, 2, 3], device=DEVICE)
    loss, grad = run(student, teacher, target, backend, divergence=divergence, reduction="none")
    assert loss[1].isnan() and not loss[[0, 2]].isnan().any()
    assert grad[1].isnan().any() and not grad[[0, 2]].isnan().any()
    ref_loss, ref_grad = exact(student, teacher, target, divergence=divergence, reduction="none")
    assert torch.equal(grad.isnan(), ref_grad.isnan()) and torch.equal(loss.isnan(), ref_loss.isnan())


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_counted_row_of_all_neg_inf_is_nan(backend, alpha):
    """A counted row whose student and teacher logits are all -inf has no distribution: NaN, not 0."""
    student, teacher = logits(3, 10, seed=62), logits(3, 10, seed=63)
    student[1], teacher[1] = -math.inf, -math.inf
    target = torch.tensor([1, 2, 3], device=DEVICE)
    loss, _ = run(student, teacher, target, backend, alpha=alpha, reduction="none")
    assert loss[1].isnan() and not loss[[0, 2]].isnan().any()
    assert run(student, teacher, target, backend, alpha=alpha)[0].isnan()


@pytest.mark.parametrize("which", ["temperature", "teacher_temperature"])
def test_unchecked_bad_tensor_temperature_gives_a_nan_row(backend, which):
    """validate_args=False (and torch.compile) skip the temperature check; a per-row temperature <= 0
    then gives a NaN row on every backend, never a finite one."""
    temperature = torch.tensor([2.0, -1.0, -1.0, 0.0], device=DEVICE)  # row 1 is ignored: 0 whatever its T
    options = {which: temperature, "reduction": "none"}
    loss, grad = run(S, T_, Y, backend, validate_args=False, **options)
    assert loss[2:].isnan().all() and loss[1] == 0 and loss[0].isfinite()
    assert grad[2:].isnan().any(-1).all() and not grad[:2].isnan().any()
    compiled = torch.compile(lambda s, t: fastkd.kd_loss(s, t, Y, backend=backend, **options), fullgraph=True)
    assert compiled(S, T_)[2:].isnan().all()


def test_probabilities_passed_as_logits_are_refused(backend):
    """Softmax outputs passed as logits (a plausible wrong loss) raise, naming the argument."""
    p, q = torch.softmax(S, -1), torch.softmax(T_, -1)
    with pytest.raises(ValueError, match="teacher_logits look like probabilities.*pass p.log()"):
        fastkd.kd_loss(S, q, Y, backend=backend)
    with pytest.raises(ValueError, match="student_logits look like probabilities"):
        fastkd.kd_loss(p, T_, Y, backend=backend)
    fastkd.kd_loss(S, q, Y, backend=backend, validate_args=False)  # unchecked: taken as logits
    assert_close(run(S, q.log(), Y, backend)[0], exact(S, T_, Y)[0], torch.float32)  # log p is a teacher's logits


def test_inplace_grad_refuses_a_view_of_a_parameter():
    """inplace_grad=True on a view of a parameter would overwrite the parameter: refused."""
    weight = torch.nn.Parameter(logits(4, 10).reshape(-1).clone())
    with pytest.raises(ValueError, match="overwrite a leaf that requires grad .*a view of one"):
        fastkd.kd_loss(weight.view(4, 10), T_, Y, inplace_grad=True, backend="triton")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loss_is_float32_for_half_inputs(backend, dtype):
    """The loss of half-precision logits is returned in float32 (as F.cross_entropy under autocast), not
    rounded to the logits' dtype; the gradient keeps their dtype."""
    student, teacher = logits(8, 300, dtype=dtype), logits(8, 300, dtype=dtype, seed=1)
    loss, grad = run(student, teacher, targets(8, 300), backend)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    want = exact(student, teacher, targets(8, 300))[0]
    assert abs(loss.double() - want) < abs(loss.to(dtype).double() - want) or loss.to(dtype).double() == want


def test_module_constructors_check_their_arguments():
    """A module's keywords are checked when it is built, not at its first forward."""
    for make, match in [
        (lambda: fastkd.KDLoss(temperature=0), "temperature must be finite and > 0"),
        (lambda: fastkd.KDLoss(alpha=2), "alpha must be in"),
        (lambda: fastkd.KDLoss(divergence="kl"), "divergence must be one of"),
        (lambda: fastkd.KDLoss(tail="both"), "tail must be one of"),
        (lambda: fastkd.KDLoss(backend="fast"), "backend must be one of"),
        (lambda: fastkd.FusedLinearKDLoss(temperature=-1.0), "temperature must be finite and > 0"),
        (lambda: fastkd.FusedLinearKDLoss(chunk_size=0), "chunk_size must be >= 1"),
        (lambda: fastkd.TemperedSoftmax(temperature=0.0), "temperature must be finite and > 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            make()
    with pytest.raises(TypeError, match="positional"):
        fastkd.KDLoss(4.0, 0.9, "jsd")  # keywords only after the temperature and alpha


def test_keyword_lists_are_the_same_everywhere():
    """kd_loss's keywords are spelled out by every op and module that wraps the loss, with kd_loss's
    defaults: the one list, KD_DEFAULTS, is what each signature shows."""
    import inspect

    from fastkd._options import KD_DEFAULTS

    for fn in (fastkd.kd_loss, fastkd.KDLoss.__init__, fastkd.fused_linear_kd_loss, fastkd.FusedLinearKDLoss.__init__,
               fastkd.vocab_parallel_kd_loss):  # fmt: skip
        parameters = inspect.signature(fn).parameters
        assert {name: parameters[name].default for name in KD_DEFAULTS if name in parameters} == KD_DEFAULTS, fn
