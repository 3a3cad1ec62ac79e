"""The distillation loss's kernel split in two launches (issue 20): the forward's STATS phase writes the
row losses and N_STATS row statistics, the backward's GRAD phase writes the gradient times dL/dloss from
them. Both must give what the fused launch gives: the same row losses, and its gradient times dL/dloss.
Through autograd, the split runs where the backend's rule picks it (rows wider than one block, one
teacher) and gives float64's loss and gradient with dL/dloss != 1; the fused path runs elsewhere.
Triton only (the interpreter without a GPU); one teacher (the statistics hold one teacher's)."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS, DEVICE, DTYPES, assert_close
from test_kd_loss import check, targets

import fastkd
from fastkd import _ops
from fastkd._host import kd_outputs
from fastkd._options import KDOptions

pytestmark = pytest.mark.skipif("triton" not in BACKENDS, reason="the split is a Triton kernel's")


def _logits(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (3.0 * torch.randn(shape, generator=gen)).to(DEVICE)


@pytest.mark.parametrize("width", [37, 1000, 4097])
@pytest.mark.parametrize(
    ("divergence", "norm"),
    [("forward_kl", None), ("reverse_kl", None), ("jsd", None), ("reverse_kl", "standardize"), ("tvd", "standardize"),
     ("dkd", None), ("dkd", "spherical")],
)
@pytest.mark.parametrize("per_row", [False, True], ids=["scalar", "per_row"])
def test_stats_then_grad_is_the_fused_gradient_times_dl_dloss(width, divergence, norm, per_row):
    import fastkd.backends.triton as triton_backend
    from fastkd.kernels.kd_loss import N_STATS

    n_rows = 3
    student, teacher = _logits(n_rows, width), _logits(1, n_rows, width, seed=1)
    target = torch.randint(0, width, (n_rows,), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    target[1] = -100
    options = KDOptions(temperature=2.0, divergence=divergence, logit_norm=norm, label_smoothing=0.1, alpha=0.5,
                        reduction="none" if per_row else "mean")  # fmt: skip
    fused = kd_outputs(student, target, options, False, True)
    triton_backend._kd_launch(student, teacher, target, options, fused, "fused")
    split = kd_outputs(student, target, options, False, True)
    stats = torch.full((n_rows, N_STATS), float("nan"), device=DEVICE)
    triton_backend._kd_launch(student, teacher, target, options, split, "stats", stats)
    grad_output = (
        torch.tensor([2.5, -1.0, 0.5], device=DEVICE) if per_row else torch.tensor(2.5, device=DEVICE)
    )
    grad = torch.full_like(student, float("nan"))
    triton_backend._kd_launch(student, teacher, target, options, split, "grad", stats, grad, grad_output)
    assert_close(split.rows, fused.rows, torch.float32)
    want = fused.grad * (grad_output[:, None] if per_row else grad_output)
    assert_close(grad, want, torch.float32)
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))  # the ignored row


@pytest.fixture
def launches(monkeypatch):
    """The Triton backend's loss launches by phase, counted: {"fused": n, "stats": n, "grad": n, "scale": n}."""
    import fastkd.backends.triton as triton_backend

    counts = {"fused": 0, "stats": 0, "grad": 0, "scale": 0}
    launch, scale = triton_backend._kd_launch, triton_backend.scale_grad_

    def counted_launch(*args, **kwargs):
        counts[args[5]] += 1
        return launch(*args, **kwargs)

    def counted_scale(*args):
        counts["scale"] += 1
        return scale(*args)

    monkeypatch.setattr(triton_backend, "_kd_launch", counted_launch)
    monkeypatch.setattr(triton_backend, "scale_grad_", counted_scale)
    return counts


@pytest.mark.parametrize("reduction", ["mean", "none"])  # dL/dloss 2 (scalar); random per row (run's weights)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [4097, 1000])  # split (two passes fused); fused (one block)
def test_autograd_takes_the_split_for_wide_rows(launches, width, dtype, reduction):
    """Through autograd with dL/dloss != 1: a row wider than one block runs STATS in the forward and
    GRAD in the backward (no fused launch, no scale), a narrow one the fused launch and the scale; both
    give float64's loss and gradient. Non-contiguous student and teacher (rows of wider tensors, a
    teacher with the classes not last in memory), an ignored row, label smoothing."""
    gen = torch.Generator().manual_seed(3)
    student = (3.0 * torch.randn(4, width + 3, generator=gen)).to(DEVICE, dtype)[:, 1 : width + 1]
    teacher = (3.0 * torch.randn(width, 4, generator=gen)).to(DEVICE, dtype).t()
    target = targets(4, width, ignored=(1,))
    _, grad = check(student, teacher, target, "triton", temperature=2.0, label_smoothing=0.1, reduction=reduction)
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))  # the ignored row
    # check runs the Triton backend once with autograd (then the float64 reference and PyTorch)
    split = width > 4096
    assert launches == {"fused": 0 if split else 1, "stats": int(split), "grad": int(split), "scale": 0 if split else 1}


@pytest.mark.parametrize(("divergence", "norm"), [("reverse_kl", "standardize"), ("jsd", None), ("dkd", None)])
def test_autograd_split_divergences(launches, divergence, norm):
    """The split through autograd for reverse KL with logit_norm (its row sums online, the
    normalization's statistics stored), JSD (its third pass in the forward) and DKD (its row values
    stored), times 2.5."""
    student, teacher = _logits(3, 4097), _logits(3, 4097, seed=1)
    target = targets(3, 4097, ignored=(2,))
    options = {"temperature": 3.0, "divergence": divergence, "logit_norm": norm, "alpha": 0.7}
    x = student.clone().requires_grad_()
    loss = fastkd.kd_loss(x, teacher, target, backend="triton", **options)
    (2.5 * loss).backward()
    xd = student.double().requires_grad_()
    want = fastkd.reference.kd_loss(xd, teacher.double(), target, **options)
    (2.5 * want).backward()
    assert_close(loss, want.detach(), torch.float32)
    assert_close(x.grad, xd.grad, torch.float32)
    assert launches["stats"] == 1 and launches["grad"] == 1 and launches["fused"] == 0


def test_split_rule():
    """Where the split is not taken: no gradient wanted, the gradient written into the student, an
    ensemble, a sparse teacher, the loss's parts asked for, soft-capping, one block; and a backend
    without ``kd_loss_split`` (the PyTorch one) never splits. DKD splits (its row values are statistics)."""
    import fastkd.backends.torch as torch_backend
    import fastkd.backends.triton as triton_backend

    s, t = torch.empty(2, 5000, device="meta"), torch.empty(1, 2, 5000, device="meta")
    options = KDOptions()
    assert _ops.kd_split(triton_backend, s, t, None, options, False, True)
    assert _ops.kd_split(triton_backend, s, t, None, KDOptions(divergence="dkd"), False, True)
    assert not _ops.kd_split(triton_backend, s, t, None, options, False, False)
    assert not _ops.kd_split(triton_backend, s, t, None, options, True, True)
    assert not _ops.kd_split(triton_backend, s, t.expand(2, 2, 5000), None, options, False, True)
    assert not _ops.kd_split(triton_backend, s, (s[:, :4].long(), s[:, :4]), None, options, False, True)
    assert not _ops.kd_split(triton_backend, s, t, None, KDOptions(return_parts=True), False, True)
    assert not _ops.kd_split(triton_backend, s, t, None, KDOptions(softcap=30.0), False, True)
    assert not _ops.kd_split(triton_backend, s[:, :4096], t[..., :4096], None, options, False, True)
    assert not _ops.kd_split(torch_backend, s, t, None, options, False, True)


def test_split_backward_runs_once():
    """The autograd contract of every backend, on the split path too: one backward per forward."""
    x = _logits(2, 4097).requires_grad_()
    loss = fastkd.kd_loss(x, _logits(2, 4097, seed=1), alpha=1.0, backend="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        loss.backward()


def test_split_compiles_fullgraph(launches):
    """torch.compile(fullgraph=True) traces the split's two torch.library ops (no graph break) and gives
    the eager loss and gradient, per row with a random dL/dloss."""
    torch._dynamo.reset()
    student, teacher, target = _logits(3, 4097), _logits(3, 4097, seed=1), targets(3, 4097, ignored=(1,))
    weights = torch.tensor([0.5, -2.0, 3.0], device=DEVICE)

    def step(x):
        return (fastkd.kd_loss(x, teacher, target, temperature=2.0, backend="triton", reduction="none") * weights).sum()

    grads = []
    for fn in (torch.compile(step, fullgraph=True), step):
        x = student.clone().requires_grad_()
        fn(x).backward()
        grads.append(x.grad)
    assert_close(grads[0], grads[1].double(), torch.float32)
    assert launches["stats"] == 2 and launches["grad"] == 2 and launches["fused"] == 0


def test_split_ops_opcheck():
    """The split's ops: schema and fake tensors (torch.library.opcheck)."""
    from fastkd._ops import _kd_grad_bwd_op, _kd_stats_fwd_op

    s, t, y = _logits(2, 4097), _logits(1, 2, 4097, seed=1), targets(2, 4097, ignored=())
    options = KDOptions.checked(temperature=2.0).bind(s, y, check_values=True).to_op()
    torch.library.opcheck(_kd_stats_fwd_op, (s, t, y, *options, "triton"), test_utils=("test_schema", "test_faketensor"))
    _, stats, scale = _kd_stats_fwd_op(s, t, y, *options, "triton")
    go = torch.tensor([2.0, 0.5], device=DEVICE)
    torch.library.opcheck(_kd_grad_bwd_op, (s, t, y, stats, scale, go, *options, "triton"),
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip
