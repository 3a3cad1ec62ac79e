"""The distillation objectives beyond KL and JSD (skew KL, skew reverse KL, TVD, the alpha-beta
divergence, DKD), logit soft-capping, the loss's parts and a caller's normalizer: every backend against
the float64 reference, and the reference against the papers' own formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, DTYPES, assert_close
from test_kd_loss import check, exact, logits, run, targets
from test_kd_loss_topk import sparse_teacher

import fastkd
from fastkd import reference

# (divergence, its parameters): each new objective, and the alpha-beta divergence's cases.
OBJECTIVES = {
    "skew_kl": dict(divergence="skew_kl", skew=0.1),
    "skew_kl_0.5": dict(divergence="skew_kl", skew=0.5),
    "skew_reverse_kl": dict(divergence="skew_reverse_kl", skew=0.1),
    "tvd": dict(divergence="tvd"),
    "ab": dict(divergence="ab", ab_alpha=0.8, ab_beta=0.4),
    "ab_beta_0": dict(divergence="ab", ab_alpha=0.6, ab_beta=0.0),
    "ab_alpha_0": dict(divergence="ab", ab_alpha=0.0, ab_beta=0.7),
    "dkd": dict(divergence="dkd", dkd_alpha=1.0, dkd_beta=8.0),
}


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("width", [1, 10, 1000, 4097])
def test_objectives_match_float64(backend, objective, width):
    student, teacher, target = logits(6, width), logits(6, width, seed=1), targets(6, width, ignored=(1, 4))
    check(student, teacher, target, backend, temperature=2.0, alpha=0.7, **OBJECTIVES[objective])


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_objectives_by_dtype(backend, objective, dtype):
    student, teacher = logits(8, 300, dtype=dtype), logits(8, 300, dtype=dtype, seed=1)
    check(student, teacher, targets(8, 300), backend, temperature=3.0, **OBJECTIVES[objective])


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_objectives_in_wide_bf16_rows_with_softcap(backend, objective):
    """A row wider than one block (the kernels' column loop, with an edge) in bfloat16, -inf entries, an
    ignored row, soft-capped logits."""
    student, teacher = logits(3, 5003, dtype=torch.bfloat16), logits(3, 5003, dtype=torch.bfloat16, seed=1)
    student[:, ::11], teacher[:, ::11] = -math.inf, -math.inf
    target = targets(3, 5003, ignored=(1,))
    target = torch.where(target % 11 == 0, target + 1, target)
    check(student, teacher, target, backend, temperature=2.0, alpha=0.8, softcap=8.0, **OBJECTIVES[objective])


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_objectives_with_masked_classes_norms_and_ensembles(backend, objective):
    """-inf entries in both (probability 0, no gradient), logit standardization, 2 teachers, per-row
    temperatures; then label smoothing (where no class is masked: its CE would be infinite)."""
    student, teacher = logits(5, 70), logits(2, 5, 70, seed=1)
    student[:, ::7], teacher[:, :, ::7] = -math.inf, -math.inf
    target = targets(5, 70)
    target = torch.where(target % 7 == 0, target + 1, target)
    t = torch.rand(5, device=DEVICE) + 1.0
    loss, grad = check(student, teacher, target, backend, temperature=t, logit_norm="standardize",
                       **OBJECTIVES[objective])  # fmt: skip
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    check(logits(5, 70), teacher.nan_to_num(neginf=-3.0), target, backend, label_smoothing=0.1,
          **OBJECTIVES[objective])  # fmt: skip


@pytest.mark.parametrize("objective", ["skew_kl", "skew_reverse_kl", "tvd", "ab"])
def test_objectives_against_a_sparse_teacher(backend, objective):
    """Over the k + 1 classes of a sparse teacher (DKD needs the dense one), and equal to the dense loss
    when k = V."""
    student, target = logits(4, 200), targets(4, 200)
    indices, values, teacher = sparse_teacher((4,), 200, 16)
    options = dict(OBJECTIVES[objective], temperature=2.0, alpha=0.6)
    check(student, None, target, backend, teacher_topk=(indices, values), tail="bucket", **options)
    indices, values, teacher = sparse_teacher((4,), 37, 37)
    sparse = run(student[:, :37], None, target % 37, backend, teacher_topk=(indices, values), **options)
    dense = exact(student[:, :37], torch.log_softmax(teacher, -1).float(), target % 37, **options)
    assert_close(sparse[0], dense[0], torch.float32)
    assert_close(sparse[1], dense[1], torch.float32, scale=dense[1].abs().max().item())


SPARSE_OBJECTIVES = [name for name in OBJECTIVES if name != "dkd"]  # DKD needs a dense teacher
REVERSE_LIKE = ("ab_alpha_0",)  # infinite with tail="none" (refused) or a teacher probability of 0 at I


@pytest.mark.parametrize("objective", SPARSE_OBJECTIVES)
@pytest.mark.parametrize("tail", ["none", "bucket"])
@pytest.mark.parametrize("width", [37, 4097])
def test_sparse_objectives_match_float64(backend, objective, tail, width):
    """Each objective over a sparse teacher's k + 1 classes at odd widths, both tails, two temperatures,
    label smoothing and ignored rows (whose indices and values may be anything)."""
    if tail == "none" and objective in REVERSE_LIKE:
        pytest.skip("refused: infinite wherever the student has mass outside I")
    student, target = logits(6, width), targets(6, width, ignored=(1, 4))
    indices, values, _ = sparse_teacher((6,), width, 16)
    indices[1, 0], values[4, 2] = -7, float("nan")
    check(student, None, target, backend, teacher_topk=(indices, values), tail=tail, temperature=2.0,
          teacher_temperature=1.5, alpha=0.7, label_smoothing=0.1, **OBJECTIVES[objective])  # fmt: skip


@pytest.mark.parametrize("objective", SPARSE_OBJECTIVES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_objectives_by_dtype(backend, objective, dtype):
    indices, values, _ = sparse_teacher((8,), 301, 20, dtype=dtype)
    check(logits(8, 301, dtype=dtype), None, targets(8, 301), backend, teacher_topk=(indices, values), tail="bucket",
          temperature=3.0, **OBJECTIVES[objective])  # fmt: skip


@pytest.mark.parametrize("objective", SPARSE_OBJECTIVES)
def test_sparse_objectives_with_masked_classes(backend, objective):
    """-inf student logits outside I (probability 0, no gradient there), a teacher log-probability of -inf
    at I (but for the divergences that weigh log(q / p) by q alone, infinite there), per-row
    temperatures, a student tail below float32's resolution in a row."""
    indices, values, _ = sparse_teacher((4,), 300, 10)
    if objective not in REVERSE_LIKE:
        values[:, 0] = -math.inf
    student = logits(4, 300)
    outside = torch.ones_like(student, dtype=torch.bool).scatter(-1, indices, False)
    student = torch.where(outside & (torch.arange(300, device=DEVICE) % 3 == 0), -math.inf, student)
    student[2] = torch.where(outside[2], -30.0, student[2])  # q_R ~ 1e-11
    target = indices[:, 3]  # a class that is not masked
    t = torch.rand(4, device=DEVICE) + 1.0
    for tail in ("none", "bucket") if objective not in REVERSE_LIKE else ("bucket",):
        loss, grad = check(student, None, target, backend, teacher_topk=(indices, values), tail=tail, temperature=t,
                           teacher_temperature=t.flip(0), **OBJECTIVES[objective])  # fmt: skip
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and not grad[torch.isneginf(student)].any()


# (V, k): widths below a vector, one column block with a stride of whole vectors, a column loop with an
# edge; k = 1 and k = V.
SPARSE_SHAPES = [(1, 1), (7, 1), (7, 7), (1000, 1), (1000, 1000), (5003, 16)]


@pytest.mark.parametrize("objective", SPARSE_OBJECTIVES)
@pytest.mark.parametrize("shape", SPARSE_SHAPES, ids=lambda s: f"V={s[0]}-k={s[1]}")
def test_sparse_objectives_at_odd_widths_and_k(backend, objective, shape):
    """Each objective at widths that are not multiples of a vector or a block, with k = 1 and k = V (the
    bucket then empty and dropped), both tails, an ignored row, label smoothing."""
    width, k = shape
    student, target = logits(5, width, seed=3), targets(5, width, ignored=(2,))
    indices, values, _ = sparse_teacher((5,), width, k, seed=4)
    for tail in ("none", "bucket") if objective not in REVERSE_LIKE else ("bucket",):
        check(student, None, target, backend, teacher_topk=(indices, values), tail=tail, temperature=1.5,
              alpha=0.7, label_smoothing=0.1, **OBJECTIVES[objective])  # fmt: skip


@pytest.mark.parametrize("objective", ["forward_kl", "reverse_kl", "jsd"] + SPARSE_OBJECTIVES)
def test_sparse_objectives_in_wide_bf16_rows_with_softcap(backend, objective):
    """A bf16 row wider than one block (the column loop with an edge), -inf entries outside I, an ignored
    row, soft-capped student logits, against float64."""
    width = 5003
    student, target = logits(3, width, dtype=torch.bfloat16), targets(3, width, ignored=(1,))
    indices, values, _ = sparse_teacher((3,), width, 40, dtype=torch.bfloat16)
    outside = torch.ones_like(student, dtype=torch.bool).scatter(-1, indices, False)
    student = torch.where(outside & (torch.arange(width, device=DEVICE) % 11 == 0), -math.inf, student)
    target = torch.where(target % 11 == 0, target + 1, target)  # not a masked class
    options = OBJECTIVES.get(objective, dict(divergence=objective))
    check(student, None, target, backend, teacher_topk=(indices, values), tail="bucket", temperature=2.0, alpha=0.8,
          softcap=8.0, **options)  # fmt: skip


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("objective", ["jsd", "skew_reverse_kl", "tvd", "ab_beta_0"])
def test_return_parts_with_a_sparse_teacher(backend, objective, alpha):
    """return_parts=True over a sparse teacher: (total, c D, CE) from the same call, against float64, both
    parts whatever alpha; the gradient is the total's."""
    student, target = logits(6, 301), targets(6, 301)
    indices, values, _ = sparse_teacher((6,), 301, 12)
    options = dict(OBJECTIVES.get(objective, dict(divergence=objective)), alpha=alpha, temperature=2.0,
                   teacher_topk=(indices, values), tail="bucket", reduction="none")  # fmt: skip
    x = student.clone().requires_grad_()
    total, kd, ce = fastkd.kd_loss(x, None, target, return_parts=True, backend=backend, **options)
    want = reference.kd_loss(student.double(), None, target, return_parts=True,
                             **dict(options, teacher_topk=(indices, values.double())))  # fmt: skip
    for got, expected in zip((total, kd, ce), want):
        assert_close(got, expected, torch.float32, scale=max(expected.abs().max().item(), 1.0))
    total.sum().backward()
    _, want_grad = run(student, None, target, backend, **options)
    weights = logits(6, dtype=torch.float32, seed=7, scale=1.0)  # run's weights of a loss per row
    assert_close(x.grad * weights[:, None], want_grad.double(), torch.float32, scale=want_grad.abs().max().item())


@pytest.mark.parametrize("objective", ["forward_kl", "reverse_kl", "jsd", "skew_reverse_kl", "tvd", "ab"])
def test_soft_capping_with_a_sparse_teacher(backend, objective):
    """softcap caps the student's logits (CE included), not the teacher's stored values (log-probabilities,
    not logits), with the gradient through the tanh; -inf stays masked."""
    options = OBJECTIVES.get(objective, dict(divergence=objective))
    student, target = logits(6, 501, scale=20.0), targets(6, 501, ignored=(2,))
    indices, values, _ = sparse_teacher((6,), 501, 12)
    outside = torch.ones_like(student, dtype=torch.bool).scatter(-1, indices, False)
    student = torch.where(outside & (torch.arange(501, device=DEVICE) == 3), -math.inf, student)
    loss, grad = check(student, None, target, backend, teacher_topk=(indices, values), tail="bucket", softcap=15.0,
                       temperature=2.0, alpha=0.8, **options)  # fmt: skip
    capped = torch.where(torch.isneginf(student), student, 15.0 * torch.tanh(student / 15.0)).double()
    by_hand = reference.kd_loss(capped, None, target, teacher_topk=(indices, values.double()), tail="bucket",
                                temperature=2.0, alpha=0.8, **options)  # fmt: skip
    assert_close(loss, by_hand, torch.float32)
    assert not grad[torch.isneginf(student)].any()


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "skew_kl", "dkd"])
def test_soft_capping(backend, divergence):
    """softcap=c caps student and teacher logits at c tanh(z / c) (Gemma 2) inside the loss, CE included,
    with the gradient through the tanh; -inf stays masked."""
    student, teacher, target = logits(6, 500, scale=20.0), logits(6, 500, seed=1, scale=20.0), targets(6, 500)
    student[:, 3] = -math.inf
    teacher[:, 3] = -math.inf
    loss, grad = check(student, teacher, target, backend, divergence=divergence, softcap=15.0, temperature=2.0)
    capped = [torch.where(torch.isneginf(z), z, 15.0 * torch.tanh(z / 15.0)) for z in (student, teacher)]
    by_hand = reference.kd_loss(capped[0].double(), capped[1].double(), target, divergence=divergence, temperature=2.0)
    assert_close(loss, by_hand, torch.float32)
    assert grad[:, 3].eq(0).all()


def test_reference_limits_and_special_cases():
    """The objectives' named limits, in float64: skew 0 is the plain KL; the alpha-beta divergence is
    forward KL at (1, 0), reverse KL at (0, 1) and continuous in (alpha, beta) at beta = 0, alpha = 0
    and alpha + beta = 0; TVD is half the L1 distance."""
    g = torch.Generator().manual_seed(3)
    log_p = torch.log_softmax(torch.randn(5, 40, generator=g, dtype=torch.float64) * 2, -1)
    log_q = torch.log_softmax(torch.randn(5, 40, generator=g, dtype=torch.float64) * 2, -1)
    kd = reference.kd_divergence
    close = lambda a, b, tol=1e-12: torch.testing.assert_close(a, b, rtol=tol, atol=tol)  # noqa: E731
    close(kd(log_p, log_q, "skew_kl", skew=0.0), kd(log_p, log_q, "forward_kl"))
    close(kd(log_p, log_q, "skew_reverse_kl", skew=0.0), kd(log_p, log_q, "reverse_kl"))
    close(kd(log_p, log_q, "ab", ab=(1.0, 0.0)), kd(log_p, log_q, "forward_kl"))
    close(kd(log_p, log_q, "ab", ab=(0.0, 1.0)), kd(log_p, log_q, "reverse_kl"))
    for a, b in [(0.6, 0.0), (0.0, 0.7), (1.0, 0.0)]:
        close(kd(log_p, log_q, "ab", ab=(a + 1e-7 * (a == 0), b + 1e-7 * (b == 0))), kd(log_p, log_q, "ab", ab=(a, b)),
              1e-5)  # fmt: skip
    close(kd(log_p, log_q, "tvd"), 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1))
    # The skew KLs as DistiLLM writes them (cross-entropies to the mixture: theirs drops p log p).
    p, q = log_p.exp(), log_q.exp()
    close(kd(log_p, log_q, "skew_kl", skew=0.1), (p * log_p).sum(-1) - (p * (0.1 * p + 0.9 * q).log()).sum(-1))
    close(kd(log_p, log_q, "skew_reverse_kl", skew=0.1), (q * (log_q - (0.9 * p + 0.1 * q).log())).sum(-1))


@pytest.mark.parametrize("width", [1, 7, 1000, 5003])
@pytest.mark.parametrize("variant", ["one teacher", "logit_norm and 2 teachers"])
def test_dkd_at_odd_widths(backend, width, variant):
    """DKD at odd widths (one class: no non-target distribution, loss and gradient 0; one block; the
    column loop with an edge), -inf entries, an ignored row, a non-contiguous student and teacher (rows
    of a wider tensor; classes not last in memory), per-row temperatures."""
    student = logits(5, width + 3)[:, 1 : width + 1]
    teacher = logits(width, 5, seed=1).t()
    options = dict(OBJECTIVES["dkd"], alpha=0.8)
    if variant != "one teacher":
        teacher = logits(2, width, 5, seed=1).transpose(1, 2)
        options.update(logit_norm="standardize")
    target = targets(5, width, ignored=(1,))
    if width > 3:
        student[:, ::5], teacher[..., ::5] = -math.inf, -math.inf
        target = torch.where((target % 5 == 0) & (target >= 0), target + 1, target)
    t = torch.rand(5, device=DEVICE) + 1.0
    loss, grad = check(student, teacher, target, backend, temperature=t, **options)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and not grad[torch.isneginf(student)].any()


def test_dkd_special_rows(backend):
    """Rows where DKD's pieces vanish, against float64 with every reduction and return_parts: the
    teacher's mass all on the target (its other classes -inf: NCKD 0), the student's too (loss 0), a
    target the teacher masks (p_y = 0), a target the student masks (TCKD infinite); extreme logits
    (+-1e4, at T = 5000 and spherically normalized); NaN in gives NaN out; an unchecked target outside
    [0, V) gives a NaN row."""
    student, teacher, target = logits(6, 50), logits(6, 50, seed=1), targets(6, 50, ignored=(5,))
    y = target[:4]
    others = torch.ones(4, 50, dtype=torch.bool, device=DEVICE).scatter(1, y[:, None], False)
    teacher[:2] = torch.where(others[:2], -math.inf, teacher[:2])
    student[1] = torch.where(others[1], -math.inf, student[1])
    teacher[2, y[2]] = -math.inf
    for reduction in ("mean", "sum", "batchmean", "none"):
        check(student[:3], teacher[:3], target[:3], backend, reduction=reduction, temperature=2.0, **OBJECTIVES["dkd"])
        parts = fastkd.kd_loss(student[:3], teacher[:3], target[:3], backend=backend, reduction=reduction,
                               return_parts=True, temperature=2.0, **OBJECTIVES["dkd"])  # fmt: skip
        want = reference.kd_loss(student[:3].double(), teacher[:3].double(), target[:3], reduction=reduction,
                                 return_parts=True, temperature=2.0, **OBJECTIVES["dkd"])  # fmt: skip
        for got, expected in zip(parts, want):
            assert_close(got, expected, torch.float32, scale=max(expected.abs().max().item(), 1.0))
    kd = run(student[:2], teacher[:2], target[:2], backend, reduction="none", alpha=1.0, **OBJECTIVES["dkd"])[0]
    assert kd[1] == 0 and kd[0] > 0  # all mass on y in both: nothing to distil; in the teacher only: TCKD
    student[3, y[3]] = -math.inf
    loss = run(student[3:], teacher[3:], target[3:], backend, reduction="none", **OBJECTIVES["dkd"])[0]
    assert loss[0] == math.inf and loss[2] == 0
    extreme_s, extreme_t = logits(4, 300, scale=1.0) * 1e4, logits(4, 300, seed=1, scale=1.0) * 1e4
    check(extreme_s, extreme_t, targets(4, 300), backend, temperature=5000.0, **OBJECTIVES["dkd"])
    check(extreme_s, extreme_t, targets(4, 300), backend, logit_norm="spherical", **OBJECTIVES["dkd"])
    nan_teacher = teacher[3:].clone()
    nan_teacher[0, 7] = math.nan
    loss, grad = run(student[3:].nan_to_num(neginf=0.0), nan_teacher, target[3:], backend, reduction="none",
                     **OBJECTIVES["dkd"])  # fmt: skip
    assert loss[0].isnan() and not loss[1:].isnan().any()
    out_of_range = torch.tensor([0, 50, -100], device=DEVICE)
    loss, grad = run(student[3:], teacher[3:], out_of_range, backend, reduction="none", validate_args=False,
                     **OBJECTIVES["dkd"])  # fmt: skip
    assert loss[1].isnan() and not loss[[0, 2]].isnan().any()


def test_dkd_matches_mdistiller():
    """DKD against a float64 re-derivation of mdistiller's dkd_loss (its -1000 logit shift excludes
    the target from NCKD's softmax; the exact exclusion agrees to float64's precision at these logits)."""
    student, teacher = logits(16, 100, dtype=torch.float64), logits(16, 100, dtype=torch.float64, seed=1)
    target, temperature, a, b = targets(16, 100, ignored=()), 4.0, 1.0, 8.0
    gt = F.one_hot(target, 100).bool()
    p_s, p_t = F.softmax(student / temperature, 1), F.softmax(teacher / temperature, 1)
    binary_s = torch.stack([(p_s * gt).sum(1), (p_s * ~gt).sum(1)], 1)
    binary_t = torch.stack([(p_t * gt).sum(1), (p_t * ~gt).sum(1)], 1)
    tckd = F.kl_div(binary_s.log(), binary_t, reduction="sum") * temperature**2 / 16
    nckd = F.kl_div(F.log_softmax(student / temperature - 1000.0 * gt, 1), F.softmax(teacher / temperature - 1000.0 * gt, 1),
                    reduction="sum") * temperature**2 / 16  # fmt: skip
    want = a * tckd + b * nckd
    got = reference.kd_loss(student, teacher, target, divergence="dkd", dkd_alpha=a, dkd_beta=b, alpha=1.0,
                            temperature=temperature)  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_tvd_matches_distillm():
    """TVD against DistiLLM's tv_distance (0.5 sum |p - q|, averaged over the tokens not ignored)."""
    student, teacher, target = logits(12, 50), logits(12, 50, seed=1), targets(12, 50, ignored=(0, 5))
    p, q = F.softmax(teacher.double(), -1), F.softmax(student.double(), -1)
    mask = (target != -100).double()
    want = ((0.5 * (p - q).abs()).sum(-1) * mask).sum() / mask.sum()
    got = fastkd.kd_loss(student.double(), teacher.double(), target, divergence="tvd", alpha=1.0, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_return_parts(backend, reduction, alpha):
    """return_parts=True gives (total, KD, CE) from the same call, reduced alike, total = alpha KD +
    (1 - alpha) CE; both parts computed whatever alpha; the gradient is the total's."""
    student, teacher, target = logits(6, 300), logits(6, 300, seed=1), targets(6, 300)
    x = student.clone().requires_grad_()
    total, kd, ce = fastkd.kd_loss(x, teacher, target, alpha=alpha, temperature=2.0, reduction=reduction,
                                   return_parts=True, backend=backend)  # fmt: skip
    want = reference.kd_loss(student.double(), teacher.double(), target, alpha=alpha, temperature=2.0,
                             reduction=reduction, return_parts=True)  # fmt: skip
    for got, expected in zip((total, kd, ce), want):
        assert_close(got, expected, torch.float32, scale=max(expected.abs().max().item(), 1.0))
    assert not kd.requires_grad and not ce.requires_grad and total.requires_grad
    assert_close(total, (alpha * kd.double() + (1 - alpha) * ce.double()), torch.float32, scale=1.0)
    total.sum().backward()
    _, want_grad = run(student, teacher, target, backend, alpha=alpha, temperature=2.0, reduction=reduction)
    if reduction != "none":
        assert_close(x.grad, want_grad.double() / 2, torch.float32, scale=want_grad.abs().max().item())


@pytest.mark.parametrize("objective", ["ab_alpha_0", "reverse_kl"])
def test_return_parts_of_an_infinite_divergence_at_alpha_0(backend, objective):
    """return_parts=True with alpha=0 and a divergence that is infinite on these rows (the teacher has no
    mass on a class where the student has some; reverse KL and the alpha-beta divergence with alpha = 0
    weigh log(q / p) by q): the KD part is +inf, as in float64, and adds nothing to the loss or its
    gradient, which are CE's, finite (no 0 x inf)."""
    options = OBJECTIVES.get(objective, dict(divergence=objective))
    student, teacher, target = logits(4, 33), logits(4, 33, seed=1), targets(4, 33)
    teacher[:, 4] = -math.inf
    x = student.clone().requires_grad_()
    total, kd, ce = fastkd.kd_loss(x, teacher, target, alpha=0.0, temperature=2.0, reduction="none",
                                   return_parts=True, backend=backend, **options)  # fmt: skip
    xd = student.double().requires_grad_()
    want = reference.kd_loss(xd, teacher.double(), target, alpha=0.0, temperature=2.0, reduction="none",
                             return_parts=True, **options)  # fmt: skip
    valid = target != -100
    assert kd[valid].eq(math.inf).all() and want[1][valid].eq(math.inf).all() and not kd[~valid].any()
    assert_close(total, want[0].detach(), torch.float32)
    assert_close(ce, want[2].detach(), torch.float32)
    total.sum().backward()
    want[0].sum().backward()
    assert torch.isfinite(x.grad).all()
    assert_close(x.grad, xd.grad, torch.float32)


def test_gradient_accumulation_with_a_normalizer(backend):
    """4 micro-batches each divided by normalizer = the step's rows not ignored (HF Trainer's
    num_items_in_batch) add up to the loss and gradient of one batch of all of them."""
    student, teacher, target = logits(24, 100), logits(24, 100, seed=1), targets(24, 100, ignored=(1, 2, 3, 17))
    whole, whole_grad = run(student, teacher, target, backend, temperature=2.0)  # mean over the 20 counted rows
    count = int((target != -100).sum())
    parts, grads = [], []
    for chunk in range(4):
        rows = slice(6 * chunk, 6 * chunk + 6)
        for normalizer in (count, torch.tensor(count, device=DEVICE)):
            loss, grad = run(student[rows], teacher[rows], target[rows], backend, temperature=2.0, normalizer=normalizer)
            parts.append(loss)
            grads.append(grad)
    assert_close(torch.stack(parts[::2]).sum(), whole.double(), torch.float32)
    assert_close(torch.stack(parts[1::2]).sum(), whole.double(), torch.float32)
    assert_close(torch.cat(grads[::2]), whole_grad.double(), torch.float32, scale=whole_grad.abs().max().item())


S, T_, Y = logits(4, 10), logits(4, 10, seed=1), targets(4, 10)


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(divergence="jsd", beta=0.0), ValueError, "beta=0.0 is an end of JSD's .*'forward_kl'"),
        (dict(divergence="jsd", beta=1), ValueError, "'reverse_kl' \\(beta=1\\)"),
        (dict(divergence="skew_kl", skew=1.0), ValueError, "skew must be in"),
        (dict(divergence="skew_reverse_kl", skew=-0.1), ValueError, "skew must be in"),
        (dict(divergence="ab", ab_alpha=-0.5), ValueError, "ab_alpha must be in"),
        (dict(divergence="ab", ab_alpha=0.0, ab_beta=0.0), ValueError, "ab_alpha = ab_beta = 0"),
        (dict(divergence="ab", ab_beta="1"), TypeError, "ab_beta must be a float"),
        (dict(divergence="dkd", dkd_beta=-1.0), ValueError, "dkd_beta must be in"),
        (dict(softcap=0.0), ValueError, "softcap must be in"),
        (dict(softcap=math.inf), ValueError, "softcap must be in"),
        (dict(normalizer=0), ValueError, "normalizer must be in"),
        (dict(normalizer=10, reduction="none"), ValueError, "normalizer divides the summed loss"),
        (dict(normalizer=torch.tensor([2.0, 3.0])), ValueError, "normalizer must be a number or a one-element"),
        (dict(normalizer=torch.tensor(-2.0)), ValueError, "normalizer must be finite and > 0"),
        (dict(return_parts=1), TypeError, "return_parts must be a bool"),
    ],
)
def test_bad_input(options, error, match):
    with pytest.raises(error, match=match):
        fastkd.kd_loss(S, T_, Y, **options)


def test_combinations_that_do_not_make_sense():
    with pytest.raises(ValueError, match="divergence='dkd' needs a target"):
        fastkd.kd_loss(S, T_, None, alpha=1.0, divergence="dkd")
    indices, values, _ = sparse_teacher((4,), 10, 3)
    with pytest.raises(ValueError, match="divergence='dkd' needs dense teacher_logits"):
        fastkd.kd_loss(S, None, Y, teacher_topk=(indices, values), divergence="dkd")
    with pytest.raises(ValueError, match="tail='none' is infinite"):
        fastkd.kd_loss(S, None, Y, teacher_topk=(indices, values), divergence="ab", ab_alpha=0.0, ab_beta=1.0)
    with pytest.raises(ValueError, match="tail='none' is infinite"):
        fastkd.kd_loss(S, None, Y, teacher_topk=(indices, values), divergence="skew_reverse_kl", skew=0.0)
    with pytest.raises(ValueError, match="skew must be in"):
        fastkd.KDLoss(divergence="skew_kl", skew=2.0)  # at construction


@pytest.mark.parametrize("objective", ["skew_kl", "tvd", "ab", "dkd"])
def test_fused_linear_objectives_parts_and_normalizer(backend, objective):
    """fused_linear_kd_loss takes every objective, soft-capping, return_parts and a normalizer: the same
    loss, parts and gradients as kd_loss on the materialized logits."""
    from test_fused_linear import check as linear_check
    from test_fused_linear import problem

    inputs, target = problem()
    linear_check(inputs, target, backend, chunk_size=7, temperature=2.0, softcap=5.0, **OBJECTIVES[objective])
    linear_check(inputs, target, backend, chunk_size=7, normalizer=50.0, **OBJECTIVES[objective])
    options = dict(OBJECTIVES[objective], temperature=2.0, return_parts=True)
    hidden, weight = inputs["student_hidden"], inputs["student_weight"]
    fused = fastkd.fused_linear_kd_loss(hidden, weight, inputs["teacher_hidden"], inputs["teacher_weight"], target,
                                        student_bias=inputs["student_bias"], teacher_bias=inputs["teacher_bias"],
                                        chunk_size=7, backend=backend, **options)  # fmt: skip
    student = F.linear(hidden, weight, inputs["student_bias"])
    dense = fastkd.kd_loss(student, F.linear(inputs["teacher_hidden"], inputs["teacher_weight"], inputs["teacher_bias"]),
                           target, backend=backend, **options)  # fmt: skip
    for a, b in zip(fused, dense):
        assert_close(a, b.double(), torch.float32, scale=max(b.abs().item(), 1.0))


@pytest.mark.parametrize("options", [
    {"divergence": "skew_kl", "skew": 0.1}, {"divergence": "skew_reverse_kl", "skew": 0.3}, {"divergence": "tvd"},
    {"divergence": "ab", "ab_alpha": 0.8, "ab_beta": 0.4}, {"divergence": "ab", "ab_alpha": 0.6, "ab_beta": 0.0},
    {"divergence": "ab", "ab_alpha": 0.0, "ab_beta": 0.7}, {"divergence": "jsd", "softcap": 5.0},
    {"divergence": "tvd", "return_parts": True, "alpha": 0.0}, {"divergence": "dkd"},
    {"divergence": "dkd", "logit_norm": "standardize", "softcap": 5.0}, {"divergence": "dkd", "return_parts": True},
], ids=str)  # fmt: skip
def test_objectives_run_in_the_triton_kernel(monkeypatch, options):
    """Issue 18's objectives on a dense teacher, DKD included, run in the Triton kernel, not the PyTorch
    closed form that covers what a kernel lacks (their numbers: the tests above on this backend)."""
    from fastkd.backends import torch as torch_backend

    def closed_form(*args):
        raise AssertionError("the triton backend ran the PyTorch closed form")

    monkeypatch.setattr(torch_backend, "kd_loss_forward", closed_form)
    x = logits(4, 33).requires_grad_()
    out = fastkd.kd_loss(x, logits(4, 33, seed=1), torch.tensor([0, 5, -100, 32], device=DEVICE), backend="triton",
                         **options)  # fmt: skip
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("options", [
    {"divergence": "reverse_kl"}, {"divergence": "skew_kl", "skew": 0.1}, {"divergence": "skew_reverse_kl", "skew": 0.3},
    {"divergence": "tvd"}, {"divergence": "ab", "ab_alpha": 0.8, "ab_beta": 0.4},
    {"divergence": "ab", "ab_alpha": 0.6, "ab_beta": 0.0}, {"divergence": "ab", "ab_alpha": 0.0, "ab_beta": 0.7},
    {"divergence": "jsd", "softcap": 5.0}, {"divergence": "tvd", "return_parts": True, "alpha": 0.0},
], ids=str)  # fmt: skip
def test_sparse_objectives_run_in_the_triton_kernel(monkeypatch, options):
    """Every objective of a sparse teacher, soft-capping and the parts run in the Triton sparse kernel,
    not the PyTorch closed form (their numbers: the tests above on this backend)."""
    from fastkd.backends import torch as torch_backend

    def closed_form(*args):
        raise AssertionError("the triton backend ran the PyTorch closed form")

    monkeypatch.setattr(torch_backend, "kd_loss_topk_forward", closed_form)
    x = logits(4, 33).requires_grad_()
    indices, values, _ = sparse_teacher((4,), 33, 5)
    out = fastkd.kd_loss(x, None, torch.tensor([0, 5, -100, 32], device=DEVICE), teacher_topk=(indices, values),
                         tail="bucket", backend="triton", **options)  # fmt: skip
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
