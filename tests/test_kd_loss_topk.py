"""Sparse top-k teachers: every backend against float64, the loss and the gradient wrt the student; with
k = V the sparse loss is the dense one; the float64 reference against an independent computation."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS, DEVICE, DTYPES, assert_close
from hypothesis import given
from hypothesis import strategies as st
from test_kd_loss import check as kd_check
from test_kd_loss import finite_max, logits, row_weight, targets
from test_kd_loss import run as kd_run

import fastkd
from fastkd import reference

# (divergence, values_are, tail): every combination kd_loss accepts.
MODES = [
    ("forward_kl", "logprobs", "none"),
    ("forward_kl", "logprobs", "bucket"),
    ("forward_kl", "logits", "none"),
    ("reverse_kl", "logprobs", "bucket"),
    ("jsd", "logprobs", "none"),
    ("jsd", "logprobs", "bucket"),
    ("jsd", "logits", "none"),
]


def sparse_teacher(rows, width, k, values_are="logprobs", dtype=torch.float32, seed=1, scale=3.0):
    """k distinct random classes per row of a random teacher, with their log-probabilities or logits."""
    teacher = logits(*rows, width, dtype=torch.float64, seed=seed, scale=scale)
    gen = torch.Generator().manual_seed(seed + 100)
    indices = torch.rand(*rows, width, generator=gen).argsort(-1)[..., :k].to(DEVICE)
    full = torch.log_softmax(teacher, -1) if values_are == "logprobs" else teacher
    return indices, full.gather(-1, indices).to(dtype), teacher


def run(student, topk, target=None, backend="torch", **options):
    """test_kd_loss's ``run`` with the sparse teacher ``topk``."""
    return kd_run(student, None, target, backend, teacher_topk=topk, **options)


def check(student, topk, target=None, backend="torch", **options):
    """test_kd_loss's ``check`` (against float64) with the sparse teacher ``topk``."""
    return kd_check(student, None, target, backend, teacher_topk=topk, **options)


@pytest.mark.parametrize("mode", MODES, ids="-".join)
@pytest.mark.parametrize("k", [1, 8, 1024])
def test_k_entries(backend, k, mode):
    divergence, values_are, tail = mode
    for width in (2000, 5000):  # one column block; the column loop
        indices, values, _ = sparse_teacher((4,), width, k, values_are)
        check(logits(4, width), (indices, values), targets(4, width), backend, divergence=divergence,
              values_are=values_are, tail=tail, temperature=2.0, teacher_temperature=1.5, alpha=0.7, beta=0.3)  # fmt: skip


@pytest.mark.parametrize("mode", MODES, ids="-".join)
@pytest.mark.parametrize("width", [1, 37, 300])
def test_all_classes_given_is_the_dense_loss(backend, width, mode):
    """k = V: the sparse teacher is the dense one (the bucket, empty, is dropped), at any temperatures."""
    divergence, values_are, tail = mode
    indices, values, teacher = sparse_teacher((5,), width, width, values_are)
    student, target = logits(5, width), targets(5, width)
    options = dict(divergence=divergence, temperature=2.0, teacher_temperature=3.0, alpha=0.6, label_smoothing=0.1)
    loss, grad = run(student, (indices, values), target, backend, values_are=values_are, tail=tail, **options)
    x = student.double().requires_grad_()
    dense = fastkd.kd_loss(x, teacher, target, backend="torch", **options)
    (2 * dense).backward()
    assert_close(loss, dense.detach(), torch.float32, scale=1.0)
    assert_close(grad, x.grad, torch.float32, scale=max(finite_max(x.grad), row_weight(student, target)))


@pytest.mark.parametrize("mode", MODES, ids="-".join)
def test_reference_against_merged_classes(mode):
    """The float64 reference equals D computed on the full distributions with the classes outside I
    merged into one, p from the teacher's full softmax (at T_t = 1 for the bucket, whose tempering is
    exact there; renormalized over I without it)."""
    divergence, values_are, tail = mode
    student = logits(6, 40).double()
    indices, values, teacher = sparse_teacher((6,), 40, 9, values_are)
    t_t = 1.0 if tail == "bucket" else 1.7
    q = torch.softmax(student / 2.0, -1)
    p = torch.softmax(teacher / t_t, -1)
    top = torch.zeros_like(q, dtype=torch.bool).scatter(-1, indices, True)
    q_c = torch.cat([q.gather(-1, indices), (q * ~top).sum(-1, keepdim=True)], -1)
    p_c = torch.cat([p.gather(-1, indices), (p * ~top).sum(-1, keepdim=True)], -1)
    if tail == "none":
        p_c = torch.cat([p_c[:, :-1] / p_c[:, :-1].sum(-1, keepdim=True), torch.zeros_like(p_c[:, -1:])], -1)
    m = 0.3 * p_c + 0.7 * q_c
    kl = lambda a, b: torch.where(a > 0, a * (a / b).log(), 0.0).sum(-1)  # noqa: E731
    want = {"forward_kl": kl(p_c, q_c), "reverse_kl": kl(q_c, p_c), "jsd": 0.3 * kl(p_c, m) + 0.7 * kl(q_c, m)}
    got = reference.kd_loss(student, None, teacher_topk=(indices, values.double()), tail=tail,
                            divergence=divergence, beta=0.3, temperature=2.0, teacher_temperature=t_t, alpha=1.0,
                            temperature_squared=False, reduction="none")  # fmt: skip
    torch.testing.assert_close(got, want[divergence])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES, ids="-".join)
def test_dtypes(backend, mode, dtype):
    divergence, values_are, tail = mode
    indices, values, _ = sparse_teacher((6,), 1000, 20, values_are, dtype=dtype)
    check(logits(6, 1000, dtype=dtype), (indices, values), targets(6, 1000), backend, divergence=divergence,
          values_are=values_are, tail=tail, temperature=2.0)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [1, 7, 1000, 5003])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 3.5, "per_row"])
@pytest.mark.parametrize("mode", [MODES[0], MODES[5]], ids="-".join)
def test_ce_temperatures(backend, mode, temperature, width, dtype):
    """KD + CE (label smoothing) where the Triton kernel takes CE's exps e^(x - max x) as the T-th powers of
    the student's e^((x - max x) / T) (T an integer in [1, 8]) and where CE takes its own (T = 3.5; a
    per-row tensor of 1, 2, 4, 3.5): forward KL (no bucket) and JSD with the bucket (r summed beside d_1),
    one block (1, 7, 1000) and the column loop (5003: rows with an edge), against float64."""
    divergence, values_are, tail = mode
    k = min(width, 5)
    indices, values, _ = sparse_teacher((4,), width, k, values_are, dtype=dtype)
    t = torch.tensor([1.0, 2.0, 4.0, 3.5], device=DEVICE) if temperature == "per_row" else temperature
    check(logits(4, width, dtype=dtype), (indices, values), targets(4, width), backend, divergence=divergence,
          values_are=values_are, tail=tail, temperature=t, alpha=0.6, label_smoothing=0.1)  # fmt: skip


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 8.0])
def test_integer_temperature_as_a_tensor(backend, temperature):
    """An integer temperature as a number (the Triton kernel: CE's exps as powers of the student's) and as
    a per-row tensor of the same value (CE's own exps): the same loss and gradient within float32's
    tolerance."""
    student, target = logits(4, 1000), targets(4, 1000)
    indices, values, _ = sparse_teacher((4,), 1000, 64)
    options = {"tail": "bucket", "label_smoothing": 0.1, "reduction": "none"}
    loss, grad = run(student, (indices, values), target, backend, temperature=temperature, **options)
    want_loss, want_grad = run(student, (indices, values), target, backend,
                               temperature=torch.full((4,), temperature, device=DEVICE), **options)  # fmt: skip
    assert_close(loss, want_loss.double(), torch.float32)
    assert_close(grad, want_grad.double(), torch.float32, scale=max(finite_max(want_grad), row_weight(student, target,
                 **options)))  # fmt: skip


@pytest.mark.parametrize("temperature", [4.0, 3.5])
def test_nan_student_logit_gives_a_nan_row(backend, temperature):
    """NaN in, NaN out through the student's exps and CE's (powers of them at T = 4, their own at 3.5), at
    I and outside it."""
    indices, values, _ = sparse_teacher((3,), 50, 6)
    student = logits(3, 50, seed=60)
    student[1, indices[1, 0]] = float("nan")
    student[2, (indices[2] + 1) % 50] = float("nan")  # (some of them) outside I
    target = torch.tensor([1, 2, 3], device=DEVICE)
    loss, grad = run(student, (indices, values), target, backend, temperature=temperature, reduction="none",
                     tail="bucket")  # fmt: skip
    assert loss[1:].isnan().all() and not loss[0].isnan()
    assert grad[1].isnan().any() and grad[2].isnan().any() and not grad[0].isnan().any()


@pytest.mark.parametrize("width", [4097, 70001])
def test_wide_rows_and_one_row(backend, width):
    indices, values, _ = sparse_teacher((2,), width, 16)
    check(logits(2, width), (indices, values), torch.tensor([width - 1, 3], device=DEVICE), backend, tail="bucket",
          divergence="jsd")  # fmt: skip
    indices, values, _ = sparse_teacher((1,), width, 5)
    check(logits(1, width), (indices, values), None, backend, alpha=1.0, tail="bucket")


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "ab"])
def test_student_tail_below_float32_resolution(backend, divergence):
    """The student puts all but ~3e-10 of its mass on the k entries, the teacher 1% outside them: q_R
    summed outside I stays ~3e-10 (1 - sum_I q would round to 0 or to ~6e-8 in float32)."""
    width, k = 3000, 4
    indices, values, _ = sparse_teacher((3,), width, k)
    values = values - torch.logsumexp(values.double(), -1, keepdim=True).float() + torch.log(torch.tensor(0.99))
    student = torch.full((3, width), -30.0, device=DEVICE).scatter(-1, indices, logits(3, k, seed=5))
    loss, grad = check(student, (indices, values), None, backend, alpha=1.0, tail="bucket", divergence=divergence)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_masked_classes(backend):
    """-inf student logits outside I (no gradient there) and a -inf teacher log-probability at I."""
    indices, values, _ = sparse_teacher((4,), 300, 10)
    values[:, 0] = float("-inf")
    student = logits(4, 300)
    outside = torch.ones_like(student, dtype=torch.bool).scatter(-1, indices, False)
    student = torch.where(outside & (torch.arange(300, device=DEVICE) % 3 == 0), float("-inf"), student)
    target = torch.gather(indices, 1, torch.full((4, 1), 3, device=DEVICE)).squeeze(1)  # a class that is not masked
    for tail in ("none", "bucket"):
        loss, grad = check(student, (indices, values), target, backend, tail=tail, divergence="jsd")
        assert torch.isfinite(loss) and not grad[torch.isneginf(student)].any()


@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
def test_reductions_ignored_rows_and_padding(backend, reduction):
    """Ignored rows may hold anything (indices out of range, repeated, NaN values): no loss, no gradient."""
    indices, values, _ = sparse_teacher((2, 3), 64, 6)
    target = targets((2, 3), 64, ignored=(1, 4))
    indices[0, 1] = -5
    values[1, 1] = float("nan")
    indices[1, 1, :2] = 7
    loss, grad = check(logits(2, 3, 64), (indices, values), target, backend, reduction=reduction, tail="bucket")
    assert torch.equal(grad[0, 1], torch.zeros_like(grad[0, 1])) and torch.equal(grad[1, 1], grad[0, 1])


def test_strided_inputs_and_per_row_temperatures(backend):
    student = logits(5, 300)[:, :257]
    indices, values, _ = sparse_teacher((5,), 257, 12)
    strided = (indices.t().contiguous().t(), values.t().contiguous().t())
    t = (torch.rand(5, 2, device=DEVICE) + 0.5)[:, 1]
    got = check(student, strided, targets(5, 257), backend, temperature=t, teacher_temperature=t.flip(0),
                tail="bucket", reduction="none")  # fmt: skip
    want = run(student.contiguous(), (indices, values), targets(5, 257), backend, temperature=t.contiguous(),
               teacher_temperature=t.flip(0).contiguous(), tail="bucket", reduction="none")  # fmt: skip
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_int32_indices_and_inplace_grad(backend):
    indices, values, _ = sparse_teacher((4,), 500, 30)
    student, target = logits(4, 500), targets(4, 500)
    want_loss, want_grad = run(student, (indices, values), target, backend, tail="bucket")
    loss, grad = run(student, (indices.int(), values), target, backend, tail="bucket")
    assert torch.equal(loss, want_loss) and torch.equal(grad, want_grad)
    x = student.clone().requires_grad_()
    buffer = x * 1.0
    loss = fastkd.kd_loss(buffer, None, target, teacher_topk=(indices, values), tail="bucket", inplace_grad=True,
                          backend=backend)  # fmt: skip
    (2 * loss).backward()
    assert torch.equal(loss, want_loss) and torch.equal(x.grad, want_grad)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd"])
def test_many_entries_in_rows_of_a_wider_buffer_in_place(backend, divergence):
    """k > 1024 (the kernels' loops over the k entries) in rows of a wider buffer whose row stride is not a
    multiple of a vector (each row its own head before the aligned body), out of place and in place (where
    the Triton launcher gathers x at I first: the dense pass overwrites it)."""
    width, k = 3001, 1500
    indices, values, _ = sparse_teacher((3,), width, k)
    student = torch.nn.functional.pad(logits(3, width), (0, 4))[:, :width]
    target, options = targets(3, width), dict(tail="bucket", divergence=divergence, temperature=2.0)
    want_loss, want_grad = check(student, (indices, values), target, backend, **options)
    x = student.detach().clone().requires_grad_()
    buffer = torch.nn.functional.pad(x, (0, 4))[:, :width]
    loss = fastkd.kd_loss(buffer, None, target, teacher_topk=(indices, values), inplace_grad=True, backend=backend,
                          **options)  # fmt: skip
    (2 * loss).backward()
    assert torch.equal(loss, want_loss) and torch.equal(x.grad, want_grad)


def test_module_takes_a_sparse_teacher():
    indices, values, _ = sparse_teacher((4,), 50, 5)
    student, target = logits(4, 50), targets(4, 50)
    module = fastkd.KDLoss(temperature=2.0, alpha=0.9, tail="bucket")
    want = fastkd.kd_loss(student, None, target, teacher_topk=(indices, values), temperature=2.0, alpha=0.9,
                          tail="bucket")  # fmt: skip
    assert torch.equal(module(student, (indices, values), target), want)


@pytest.mark.skipif("triton" not in BACKENDS, reason="FASTKD_TEST_BACKENDS leaves the triton backend out")
def test_compiled_step_matches_eager():
    """torch.compile(fullgraph=True) traces the sparse kernel's torch.library op, no graph break."""
    torch._dynamo.reset()
    indices, values, _ = sparse_teacher((8,), 300, 16)
    target = targets(8, 300)

    def step(x):
        return fastkd.kd_loss(x, None, target, teacher_topk=(indices, values), tail="bucket", backend="triton",
                              validate_args=False)  # fmt: skip

    losses = []
    for fn in (torch.compile(step, fullgraph=True), step):
        x = logits(8, 300).requires_grad_()
        loss = fn(x)
        loss.backward()
        losses.append((loss.detach(), x.grad))
    assert_close(losses[0][0], losses[1][0].double(), torch.float32)
    assert_close(losses[0][1], losses[1][1].double(), torch.float32)


def test_opcheck(backend):
    import dataclasses

    from fastkd._ops import _kd_topk_fwd_op
    from fastkd._options import KDOptions

    s, y = logits(4, 37), targets(4, 37)
    indices, values, _ = sparse_teacher((4,), 37, 5)
    per_row = torch.rand(4, device=DEVICE) + 0.5
    for target, options, need_grad in [
        (y, dataclasses.replace(KDOptions.checked(temperature=2.0), tail="bucket"), True),
        (None, KDOptions.checked(temperature=per_row, alpha=1.0, divergence="jsd", beta=0.3, reduction="none",
                                 temperature_squared=False, label_smoothing=0.1), False),
    ]:  # fmt: skip
        args = (s, indices, values, target, *options.bind(s, target, check_values=True).to_op(), backend, need_grad,
                False)  # fmt: skip
        torch.library.opcheck(_kd_topk_fwd_op, args, test_utils=("test_schema", "test_faketensor"))


def test_unchecked_bad_index_gives_nan(backend):
    indices, values, _ = sparse_teacher((3,), 40, 4)
    indices[1, 2] = 40
    loss, grad = run(logits(3, 40), (indices, values), targets(3, 40, ignored=()), backend, reduction="none",
                     validate_args=False)  # fmt: skip
    assert loss[1].isnan() and not loss[[0, 2]].isnan().any()
    if backend == "triton":
        assert not grad[[0, 2]].isnan().any()


@given(
    n_rows=st.integers(1, 5),
    width=st.sampled_from([1, 2, 17, 100, 4100]),
    k_fraction=st.floats(0.0, 1.0),
    mode=st.sampled_from(MODES + [("skew_reverse_kl", "logprobs", "bucket"), ("tvd", "logits", "none"),
                                  ("ab", "logprobs", "bucket")]),
    softcap=st.sampled_from([None, 6.0]),
    temperature=st.floats(0.5, 4.0),
    alpha=st.floats(0.0, 1.0),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    seed=st.integers(0, 2**16),
)
def test_random_problems(n_rows, width, k_fraction, mode, softcap, temperature, alpha, reduction, seed):
    divergence, values_are, tail = mode
    k = max(1, round(k_fraction * min(width, 64)))
    indices, values, _ = sparse_teacher((n_rows,), width, k, values_are, seed=seed + 1)
    check(logits(n_rows, width, seed=seed), (indices, values), targets(n_rows, width, seed=seed), "triton",
          divergence=divergence, values_are=values_are, tail=tail, softcap=softcap, temperature=temperature,
          alpha=alpha, reduction=reduction)  # fmt: skip


S, Y = logits(4, 10), targets(4, 10)
IDX, VAL, _ = sparse_teacher((4,), 10, 3)


@pytest.mark.parametrize(
    "teacher, topk, options, error, match",
    [
        (None, None, {}, ValueError, "pass exactly one teacher"),
        (logits(4, 10), (IDX, VAL), {}, ValueError, "pass exactly one teacher"),
        (logits(4, 10), None, dict(tail="bucket"), ValueError, "tail applies to a sparse teacher"),
        (None, IDX, {}, TypeError, "teacher_topk must be a pair"),
        (None, (IDX.float(), VAL), {}, TypeError, "indices must be int64"),
        (None, (IDX, VAL.long()), {}, TypeError, "values must be a float tensor"),
        (None, (IDX[:3], VAL[:3]), {}, ValueError, "row shape"),
        (None, (IDX[:, :0], VAL[:, :0]), {}, ValueError, "1 <= k <= V"),
        (None, (IDX.clamp(max=2).repeat(1, 4), VAL.repeat(1, 4)), {}, ValueError, "1 <= k <= V"),
        (None, (IDX + 10, VAL), {}, ValueError, "class index 1[0-9], outside"),
        (None, (IDX.clone().fill_(2), VAL), {}, ValueError, "distinct"),
        (None, (IDX, VAL + 5), {}, ValueError, "must be <= 0"),
        (None, (IDX, VAL.clone().fill_(-0.1)), {}, ValueError, "sum to"),
        (None, (IDX, VAL.clone().fill_(float("nan"))), {}, ValueError, "NaN"),
        (None, (IDX, VAL), dict(values_are="probs"), ValueError, "values_are must be one of"),
        (None, (IDX, VAL), dict(tail="rest"), ValueError, "tail must be one of"),
        (None, (IDX, VAL), dict(values_are="logits", tail="bucket"), ValueError, "needs values_are='logprobs'"),
        (None, (IDX, VAL), dict(divergence="reverse_kl"), ValueError, "reverse_kl.*infinite"),
        (None, (IDX, VAL), dict(logit_norm="standardize"), ValueError, "needs dense teacher_logits"),
        (None, (IDX, VAL.clone().fill_(float("inf"))), dict(values_are="logits"), ValueError, r"\+inf"),
    ],
)
def test_bad_input(teacher, topk, options, error, match):
    with pytest.raises(error, match=match):
        fastkd.kd_loss(S, teacher, Y, teacher_topk=topk, **options)
