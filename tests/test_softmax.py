"""Tempered softmax / log-softmax: every backend against float64, outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, DTYPES, assert_close
from hypothesis import given
from hypothesis import strategies as st

import fastkd
from fastkd import reference

WIDTHS = [1, 7, 1000, 4097, 32000, 70001]  # one block (odd sizes), the two-pass loop, and over 65536
TEMPERATURES = [0.5, 1.0, 4.0]
OPS = {False: fastkd.tempered_softmax, True: fastkd.tempered_log_softmax}


def randn(*shape, dtype=torch.float32, seed=0, scale=3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=gen)).to(DEVICE, dtype)


def run(log, x, temperature=1.0, grad=None, dim=-1, backend="torch"):
    """(output, dL/dx, dL/dT or None) of the op at x, with L = sum(output * grad)."""
    x = x.detach().clone().requires_grad_()
    t = temperature.detach().clone().requires_grad_() if isinstance(temperature, torch.Tensor) else temperature
    if backend == "reference":  # the float64 oracle, differentiated by autograd
        y = (reference.tempered_log_softmax if log else reference.tempered_softmax)(x, t, dim)
    else:
        y = OPS[log](x, t, dim, backend=backend)
    grad = torch.randn_like(y) if grad is None else grad
    y.backward(grad)
    return y.detach(), x.grad, (t.grad if isinstance(t, torch.Tensor) else None)


def exact(log, x, temperature=1.0, grad=None, dim=-1):
    """``run`` by the reference in float64 on the same inputs."""
    t = temperature.double() if isinstance(temperature, torch.Tensor) else temperature
    return run(log, x.double(), t, None if grad is None else grad.double(), dim, "reference")


def check(log, x, temperature=1.0, dim=-1, backend="torch", grad=None):
    """Output and gradients of ``backend`` are within the dtype's tolerance of float64.

    The gradients are differences and sums whose terms cancel; their tolerance is relative to the
    size of those terms (see ``assert_close``).
    """
    grad = randn(*x.shape, dtype=x.dtype, seed=99, scale=1.0) if grad is None else grad
    got = run(log, x, temperature, grad, dim, backend)
    y, dx, dt = exact(log, x, temperature, grad, dim)
    t = along(temperature, x, dim)
    p = y.exp() if log else y
    g = grad.double()
    c = (g if log else g * p).sum(dim, keepdim=True)
    dx_terms = (g.abs() + p * c.abs()) if log else p * (g.abs() + c.abs())  # dL/dx = (1/T)(these, signed)
    assert_close(got[0], y, x.dtype)
    assert_close(got[1], dx, x.dtype, scale=(dx_terms / t).max().item() if x.numel() else 0.0)
    if dt is not None and x.numel():
        # dL/dT = -sum_j u_j dL/dx_j over the entries whose logit is not -inf, with u = x/T shifted by a
        # row constant (the sum of dL/dx is 0): by the max (u = (x - max x)/T) or by the lse (u = log p).
        u = (x.double() - x.double().amax(dim, keepdim=True)) / t
        u = torch.maximum(u.abs(), (y if log else y.log()).abs())
        dt_terms = torch.where(torch.isneginf(x), 0.0, (u * dx.abs()).nan_to_num(nan=0.0))  # p = 0: inf * 0
        dt_scale = dt_terms.sum() if temperature.numel() == 1 else dt_terms.sum(dim).max()
        assert_close(got[2], dt, x.dtype, scale=dt_scale.item())
    return got


def along(temperature, x, dim):
    """The temperature as a float or a float64 tensor that broadcasts against x."""
    if not isinstance(temperature, torch.Tensor):
        return float(temperature)
    if temperature.numel() == 1:
        return temperature.double().reshape(())
    dim = dim % x.dim()
    return temperature.double().reshape(x.shape[:dim] + x.shape[dim + 1 :]).unsqueeze(dim)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("width", WIDTHS)
def test_matches_float64(backend, width, temperature, dtype, log):
    rows = 2 if width > 10000 else 5
    x = randn(rows, width, dtype=dtype, seed=width)
    y, _, _ = check(log, x, temperature, backend=backend)
    assert y.dtype == dtype and y.shape == x.shape


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("width", [1000, 4097, 70001])  # one block; one block with an edge; the loop
def test_masked_logits(backend, width, log):
    """-inf logits (a masked vocabulary), including whole leading blocks of a wide row."""
    x = randn(3, width, seed=1)
    x[:, : width // 3] = float("-inf")
    x[randn(3, width, seed=2) > 4] = float("-inf")
    grad = randn(3, width, seed=3, scale=1.0)  # nonzero at the masked entries too
    temperature = torch.tensor([0.5, 2.0, 3.0], device=DEVICE)
    y, dx, dt = check(log, x, temperature, backend=backend, grad=grad)
    masked = torch.isneginf(x)
    assert (y[masked] == (float("-inf") if log else 0.0)).all()
    assert torch.isfinite(dx).all() and torch.isfinite(dt).all()


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("width", [7, 70001])
def test_all_masked_row_is_nan(backend, width, log):
    x = randn(3, width, seed=4)
    x[1] = float("-inf")
    y, dx, dt = run(log, x, torch.tensor([2.0, 2.0, 2.0], device=DEVICE), backend=backend)
    assert y[1].isnan().all() and dx[1].isnan().all() and dt[1].isnan()
    assert torch.isfinite(y[[0, 2]]).all() and torch.isfinite(dx[[0, 2]]).all() and torch.isfinite(dt[[0, 2]]).all()
    torch.testing.assert_close(y, OPS[log](x, 2.0, backend="torch"), equal_nan=True)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("temperature", [0.3, "per_row"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [1000, 70001])
def test_extreme_logits(backend, width, dtype, temperature, log):
    """Logits of +-1e4 beside ordinary ones, and a row of all -1e4; the per-row temperature is 0.25
    (log-probabilities of -8e4 overflow float16 to -inf, unlike a masked logit) to 3."""
    x = randn(3, width, seed=5)
    x[:, ::97] = 1e4
    x[:, 1::89] = -1e4
    x[1] = -1e4
    if temperature == "per_row":
        temperature = torch.tensor([0.25, 1.0, 3.0], device=DEVICE)
    check(log, x.to(dtype), temperature, backend=backend)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_temperature_gradient_with_large_offset(backend, dtype, log):
    """dL/dT of logits that share a large offset, recomputed from the logits in fp32, not from a
    rounded output: accurate to the dtype's tolerance of its own (small, shifted) terms."""
    x = (randn(4, 4000, seed=20, scale=50.0) + 2e4).to(dtype)
    check(log, x, torch.tensor([16.0, 4.0, 1.0, 0.5], device=DEVICE), backend=backend)


def test_widest_rows(backend):
    """Rows of 262144 classes and a few more (the widest vocabularies), bfloat16."""
    x = randn(2, 262147, dtype=torch.bfloat16, seed=21)
    for log in (False, True):
        check(log, x, torch.tensor([0.5, 4.0], device=DEVICE), backend=backend)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_shift_invariance(backend, log):
    x = (randn(4, 5000, seed=6) * 64).round() / 64  # + 100 is exact on these values
    a = OPS[log](x, 3.0, backend=backend)
    b = OPS[log](x + 100, 3.0, backend=backend)
    assert_close(a, b.double(), torch.float32)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize(
    "layout", ["transposed", "strided_columns", "strided_rows", "middle_dim"]
)  # fmt: skip
def test_non_contiguous(backend, layout, log):
    base = randn(6, 300, 8, seed=7)
    x, dim = {
        "transposed": (base[:, :, 0].t(), 0),  # classes along dim 0
        "strided_columns": (base[:, ::2, 1], 1),  # column stride 16
        "strided_rows": (base[::2, :, 2], -1),  # row stride 2 * 300 * 8
        "middle_dim": (base, 1),  # (6, 300, 8), classes in the middle
    }[layout]
    assert x.stride(dim) != 1 or not x.is_contiguous()
    check(log, x, 2.0, dim=dim, backend=backend)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("layout", ["dim0", "transposed", "strided_columns", "expanded", "middle_dim"])
def test_non_contiguous_with_temperature_gradient(backend, layout, log):
    """A learnable per-row temperature on logits whose classes are not contiguous: the backward must read
    the logits the forward read (the kernels once read a saved strided view as contiguous rows)."""
    base = randn(6, 300, 8, seed=26)
    x, dim = {
        "dim0": (base[:5, :7, 0], 0),  # the (5, 7) at dim=0: rows along dim 1
        "transposed": (base[:, :, 0].t(), 0),
        "strided_columns": (base[:, ::2, 1], 1),
        "expanded": (base[:1, :, 2].expand(4, 300), 1),  # row stride 0
        "middle_dim": (base, 1),
    }[layout]
    row_shape = x.shape[:dim] + x.shape[dim + 1 :]
    t = torch.rand(row_shape, generator=torch.Generator().manual_seed(27)).to(DEVICE) * 3 + 0.5
    weights = torch.arange(x.numel(), dtype=torch.float32, device=DEVICE).reshape(x.shape) / x.numel()
    _, _, dt = check(log, x, t, dim=dim, backend=backend, grad=weights)
    assert dt.shape == t.shape


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_non_contiguous_temperature_gradient_compiled(backend, log):
    """The same under torch.compile, where the kernels are reached through their ops."""
    x = randn(5, 7, seed=28)
    t = torch.full((7,), 2.0, device=DEVICE)
    weights = torch.arange(35, dtype=torch.float32, device=DEVICE).view(5, 7)
    compiled = torch.compile(lambda x, t: (OPS[log](x, t, 0, backend=backend) * weights).sum(), fullgraph=True)
    x_c, t_c = x.clone().requires_grad_(), t.clone().requires_grad_()
    compiled(x_c, t_c).backward()
    _, dx, dt = exact(log, x, t, weights, 0)
    assert_close(t_c.grad, dt, torch.float32, scale=dt.abs().max().item())
    assert_close(x_c.grad, dx, torch.float32, scale=dx.abs().max().item())


def test_expanded_gradient(backend):
    """dL/dy with stride 0, as ``y.sum().backward()`` produces."""
    x = randn(4, 1000, seed=8).requires_grad_()
    fastkd.tempered_log_softmax(x, 2.0, backend=backend).sum().backward()
    x_exact = x.detach().double().requires_grad_()
    reference.tempered_log_softmax(x_exact, 2.0).sum().backward()
    assert_close(x.grad, x_exact.grad, torch.float32)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("shape", ["per_row", "keepdim", "strided", "expanded", "scalar", "one_element"])
@pytest.mark.parametrize("width", [300, 70001])
def test_tensor_temperature(backend, width, shape, log):
    """A temperature tensor, one per row or shared, and its gradient."""
    x = randn(2, 3, width, seed=9)
    t_rows = torch.rand(2, 3, generator=torch.Generator().manual_seed(10)).to(DEVICE) * 3 + 0.5
    temperature = {
        "per_row": t_rows,
        "keepdim": t_rows[..., None],
        "strided": torch.stack([t_rows, t_rows + 1], -1)[..., 0],  # stride 2 between rows
        "expanded": torch.tensor(2.5, device=DEVICE).expand(2, 3),  # stride 0
        "scalar": torch.tensor(2.5, device=DEVICE),
        "one_element": torch.tensor([2.5], device=DEVICE),
    }[shape]
    _, _, dt = check(log, x, temperature, backend=backend)
    assert dt.shape == temperature.shape


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_temperature_gradient_alone(backend, log):
    """Fixed logits and a learned temperature (temperature scaling): no dL/dx is formed."""
    x = randn(5, 300, seed=22)
    t = torch.full((5,), 2.0, device=DEVICE, requires_grad=True)
    t_exact = t.detach().double().requires_grad_()
    grad = randn(5, 300, seed=23, scale=1.0)
    OPS[log](x, t, backend=backend).backward(grad)
    OPS[log](x.double(), t_exact, backend="torch").backward(grad.double())
    assert_close(t.grad, t_exact.grad, torch.float32, scale=t_exact.grad.abs().max().item())


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_unchecked_bad_temperature_gives_nan(backend, log):
    """A tensor temperature <= 0 that is not checked (validate_args=False, or inside torch.compile)
    makes its rows NaN, never a plausible wrong answer."""
    x = randn(3, 100, seed=24)
    t = torch.tensor([2.0, -1.0, 0.0], device=DEVICE)
    y = OPS[log](x, t, backend=backend, validate_args=False)
    assert torch.isfinite(y[0]).all() and y[1:].isnan().all()
    compiled = torch.compile(lambda x, t: OPS[log](x, t, backend=backend), fullgraph=True)
    assert compiled(x, t)[1:].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_low_precision_temperature_tensor(backend, dtype):
    x = randn(4, 100, dtype=dtype, seed=11)
    temperature = torch.full((4,), 2.0, device=DEVICE, dtype=dtype)
    _, _, dt = check(True, x, temperature, backend=backend)
    assert dt.dtype == dtype


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("shape", [(0, 10), (3, 0), (1, 1), (5,)])
def test_empty_and_single(backend, shape, log):
    x = randn(*shape, seed=12)
    y, dx, dt = check(log, x, torch.tensor(2.0, device=DEVICE), backend=backend)
    assert y.shape == x.shape and dx.shape == x.shape and dt.shape == ()


def test_reference_gradcheck():
    """The oracle's own gradients (logits and per-row temperature) against finite differences."""
    x = randn(3, 17, dtype=torch.float64, seed=13)
    x[0, 3] = float("-inf")
    t = torch.tensor([0.7, 1.0, 3.0], dtype=torch.float64, device=DEVICE)
    for fn in (reference.tempered_softmax, reference.tempered_log_softmax):
        inputs = (x.clone().requires_grad_(), t.clone().requires_grad_())
        assert torch.autograd.gradcheck(lambda a, b: fn(a, b, -1).nan_to_num(neginf=0.0), inputs)


def test_reference_matches_torch_softmax():
    x = randn(5, 33, seed=14)
    torch.testing.assert_close(reference.tempered_softmax(x, 4.0), torch.softmax(x / 4.0, dim=-1))
    torch.testing.assert_close(reference.tempered_log_softmax(x, 4.0), torch.log_softmax(x / 4.0, dim=-1))


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_torch_compile_fullgraph(backend, log):
    """No graph break over the op; the compiled function and its gradient match eager."""
    op = OPS[log]

    def f(x, t):
        return (op(x, t, backend=backend) * 2).sum(-1)

    compiled = torch.compile(f, fullgraph=True)
    x = randn(4, 1000, seed=15)
    t = torch.tensor([1.0, 2.0, 3.0, 4.0], device=DEVICE)
    got = run_scalar_fn(compiled, x, t)
    want = run_scalar_fn(f, x, t)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_torch_compile_float_temperatures(backend):
    """A float temperature that changes between calls (a schedule) compiles and stays right."""
    torch._dynamo.reset()  # the lambda's code object is shared by every backend's case: its cache too
    compiled = torch.compile(lambda x, t: fastkd.tempered_log_softmax(x, t, backend=backend), fullgraph=True)
    x = randn(4, 300, seed=25)
    for t in (2.0, 3.0, 4.5):
        assert_close(compiled(x, t), reference.tempered_log_softmax(x.double(), t), torch.float32)


def run_scalar_fn(f, x, t):
    x, t = x.clone().requires_grad_(), t.clone().requires_grad_()
    y = f(x, t)
    y.backward(torch.linspace(-1, 1, y.numel(), device=DEVICE).reshape(y.shape))
    return y.detach(), x.grad, t.grad


def test_registered_ops_opcheck(backend):
    """Schema, fake-tensor and dispatch registration of the ops torch.compile sees."""
    x = randn(3, 50, seed=16)
    t = torch.tensor([1.0, 2.0, 3.0], device=DEVICE)
    fwd, bwd = torch.ops.fastkd.tempered_softmax_fwd, torch.ops.fastkd.tempered_softmax_bwd
    for log in (False, True):
        torch.library.opcheck(fwd, (x, t, 1.0, log, True, backend))
        torch.library.opcheck(fwd, (x, None, 0.5, log, False, backend))
        y, stats = fwd(x, t, 1.0, log, True, backend)
        grad = torch.randn_like(y)
        torch.library.opcheck(bwd, (grad, x, t, 1.0, stats, log, True, True, backend))  # dL/dx and dL/dT, from x
        torch.library.opcheck(bwd, (grad, x, t, 1.0, stats, log, False, True, backend))  # dL/dT alone
        torch.library.opcheck(bwd, (grad, y, None, 0.5, stats[:0], log, True, False, backend))  # dL/dx, from y


def test_double_backward_is_refused(backend):
    """The backward is fastkd's, not autograd's, on every backend: a second derivative must fail, not
    come out wrong (the reference once gave one where the kernels raised)."""
    x = randn(3, 50, seed=18).requires_grad_()
    w = randn(3, 50, seed=19).requires_grad_()
    (dx,) = torch.autograd.grad((fastkd.tempered_softmax(x, 2.0, backend=backend) * w).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="tempered_softmax has no second derivative"):
        dx.sum().backward()


def test_module(backend):
    x = randn(3, 40, seed=17)
    t = torch.nn.Parameter(torch.tensor(2.0, device=DEVICE))
    module = fastkd.TemperedSoftmax(t, log=True, backend=backend)
    assert list(module.parameters()) == [t]
    y = module(x)
    assert_close(y, reference.tempered_log_softmax(x.double(), 2.0), torch.float32)
    y[:, 0].sum().backward()
    assert t.grad is not None and torch.isfinite(t.grad)


def test_module_tensor_temperature_is_a_buffer():
    module = fastkd.TemperedSoftmax(torch.tensor([1.0, 2.0, 3.0]))
    assert list(module.state_dict()) == ["temperature"]
    assert module.to(torch.float64).temperature.dtype == torch.float64
    assert fastkd.TemperedSoftmax(4.0).state_dict() == {}


@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple),
    width=st.integers(1, 300),
    data=st.data(),
    temperature=st.floats(0.05, 20.0),
    dtype=st.sampled_from(DTYPES),
    log=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_shapes_triton(shape, width, data, temperature, dtype, log, seed):
    """Random shapes, class dims, temperatures and dtypes: the Triton kernels against float64."""
    full = shape + (width,)
    dim = data.draw(st.integers(-len(full), len(full) - 1), label="dim")
    x = randn(*full, dtype=dtype, seed=seed).movedim(-1, dim)
    check(log, x, temperature, dim=dim, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_over_2_31_elements_gpu(log):
    """Row offsets past 2^31 elements (int64 addressing), checked on the last rows."""
    rows, width = 2**31 // 65536 + 2, 65536 + 3
    x = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16)
    y = OPS[log](x, 2.0, backend="triton")
    assert_close(y[-3:], exact(log, x[-3:], 2.0)[0], torch.bfloat16)
