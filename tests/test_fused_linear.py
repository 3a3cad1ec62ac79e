"""Fused-linear KD against ``kd_loss`` on materialized logits, in float64: the loss and the gradients wrt
the student's hidden states, weight and bias, for chunk sizes that do and do not divide N."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, DTYPES, assert_close
from test_kd_loss import loss_of

import fastkd
from fastkd import fused_linear, reference

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]


def tensor(*shape, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=gen)).to(DEVICE, dtype)


def problem(n=23, h=16, h_t=24, v=101, dtype=torch.float32, bias=True, lead=None):
    """Student and teacher layers whose logits are spread over a few units, and targets with ignored rows."""
    lead = lead or (n,)
    inputs = {
        "student_hidden": tensor(*lead, h, dtype=dtype),
        "student_weight": tensor(v, h, dtype=dtype, seed=1, scale=h**-0.5 * 3),
        "teacher_hidden": tensor(*lead, h_t, dtype=dtype, seed=2),
        "teacher_weight": tensor(v, h_t, dtype=dtype, seed=3, scale=h_t**-0.5 * 3),
        "student_bias": tensor(v, dtype=dtype, seed=4) if bias else None,
        "teacher_bias": tensor(v, dtype=dtype, seed=5) if bias else None,
    }
    gen = torch.Generator().manual_seed(6)
    target = torch.randint(0, v, lead, generator=gen)
    target.view(-1)[1::5] = -100
    return inputs, target.to(DEVICE)


STUDENT = ("student_hidden", "student_weight", "student_bias")


def run(inputs, target, fused=True, **options):
    """(loss, grads wrt the student's hidden, weight and bias) of L = sum(w * loss) (w random for
    reduction "none") or 2 * loss; ``fused`` False runs ``kd_loss`` on the materialized logits. Inputs
    without a teacher layer come with ``teacher_topk`` in ``options``."""
    leaves = {k: v.detach().clone().requires_grad_(k in STUDENT) if v is not None else None for k, v in inputs.items()}
    teacher = {k: leaves.get(k) for k in ("teacher_hidden", "teacher_weight", "teacher_bias")}
    if fused:
        loss = fastkd.fused_linear_kd_loss(leaves["student_hidden"], leaves["student_weight"],
                                           teacher["teacher_hidden"], teacher["teacher_weight"], target,
                                           student_bias=leaves["student_bias"], teacher_bias=teacher["teacher_bias"],
                                           **options)  # fmt: skip
    else:
        backend = options.pop("backend", "auto")
        options.pop("chunk_size", None)
        student = F.linear(leaves["student_hidden"], leaves["student_weight"], leaves["student_bias"])
        dense = None
        if teacher["teacher_hidden"] is not None:
            dense = F.linear(teacher["teacher_hidden"], teacher["teacher_weight"], teacher["teacher_bias"])
        loss = loss_of(student, dense, target, backend, **options)
    weights = tensor(*loss.shape, dtype=loss.dtype, seed=9) if loss.dim() else torch.tensor(2.0, dtype=loss.dtype)
    (loss * weights.to(loss.device)).sum().backward()
    grads = [leaves[k].grad if leaves[k] is not None else None for k in STUDENT]
    return loss.detach(), grads


def exact(inputs, target, **options):
    """``run`` on materialized logits by the reference in float64, on the same (rounded) inputs."""
    double = {k: None if v is None else v.double() for k, v in inputs.items()}
    options = dict(options, backend="reference")
    if "teacher_topk" in options:
        options["teacher_topk"] = (options["teacher_topk"][0], options["teacher_topk"][1].double())
    for key in ("temperature", "teacher_temperature"):
        if isinstance(options.get(key), torch.Tensor):
            options[key] = options[key].double()
    return run(double, target, fused=False, **options)


def check(inputs, target, backend, **options):
    """Fused loss and gradients within the dtype's tolerance of float64; the dtype's own materialized
    computation widens it (the logits' matmul rounds in that dtype, the fused one as much)."""
    dtype = inputs["student_hidden"].dtype
    loss, grads = run(inputs, target, backend=backend, **options)
    want_loss, want_grads = exact(inputs, target, **options)
    base_loss, base_grads = run(inputs, target, fused=False, backend=backend, **options)
    assert loss.dtype == reference.compute_dtype(dtype) and loss.shape == want_loss.shape
    assert_close(loss, want_loss, dtype, baseline=base_loss)
    for got, want, base in zip(grads, want_grads, base_grads):
        assert (got is None) == (want is None)
        if got is not None:
            assert got.dtype == dtype and got.shape == want.shape
            assert_close(got, want, dtype, baseline=base)
    return loss, grads


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("chunk_size", [1, 7, 23, 64])
def test_chunks_and_divergences(backend, chunk_size, divergence):
    inputs, target = problem()
    check(inputs, target, backend, chunk_size=chunk_size, divergence=divergence, temperature=2.0, alpha=0.7)


@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
def test_reductions(backend, reduction):
    inputs, target = problem(lead=(3, 7))
    loss, _ = check(inputs, target, backend, chunk_size=5, reduction=reduction, temperature=3.0)
    assert loss.shape == ((3, 7) if reduction == "none" else ())


@pytest.mark.parametrize(
    "options",
    [
        dict(alpha=1.0, target=None),
        dict(alpha=0.0),
        dict(logit_norm="standardize", temperature=2.0),
        dict(logit_norm="spherical", norm_scale=4.0, divergence="jsd", beta=0.3),
        dict(label_smoothing=0.1, teacher_temperature=1.5, temperature=4.0, temperature_squared=False),
        dict(temperature=torch.linspace(1.0, 3.0, 23), teacher_temperature=torch.tensor(2.0)),
    ],
    ids=str,
)
def test_options(backend, options):
    inputs, target = problem()
    options = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    target = options.pop("target", target)
    check(inputs, target, backend, chunk_size=6, **options)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes(backend, dtype):
    inputs, target = problem(dtype=dtype, v=300)
    check(inputs, target, backend, chunk_size=9, temperature=2.0)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_autocast_mixed_precision(backend, divergence):
    """float32 layers and bfloat16 hidden states under torch.autocast (the usual mixed-precision layout;
    it raised TypeError): the layers run in bfloat16 as F.linear's would, the gradients come back in the
    dtypes given (float32 for the weight and bias), the loss in float32."""
    inputs, target = problem()
    inputs["student_hidden"] = inputs["student_hidden"].bfloat16()
    inputs["teacher_hidden"] = inputs["teacher_hidden"].bfloat16()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss, grads = run(inputs, target, backend=backend, divergence=divergence, chunk_size=7)
        base_loss, base_grads = run(inputs, target, fused=False, backend=backend, divergence=divergence)
    assert loss.dtype == torch.float32
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]
    rounded = {k: v.bfloat16() for k, v in inputs.items()}  # what autocast multiplies
    want_loss, want_grads = exact(rounded, target, divergence=divergence)
    assert_close(loss, want_loss, torch.bfloat16, baseline=base_loss)
    for got, want, base in zip(grads, want_grads, base_grads):
        assert_close(got, want, torch.bfloat16, baseline=base)


def test_no_bias_wide_rows_and_one_row(backend):
    inputs, target = problem(n=3, v=5000, bias=False)
    check(inputs, target, backend, chunk_size=2, divergence="reverse_kl")
    inputs, target = problem(n=1, v=7)
    check(inputs, target, backend, chunk_size=4)


def test_all_rows_ignored_and_no_rows(backend):
    inputs, target = problem(n=4)
    loss, grads = run(inputs, torch.full_like(target, -100), backend=backend, chunk_size=3)
    assert loss.item() == 0 and all(not g.any() for g in grads)
    inputs, target = problem(n=4)
    empty = {k: v if v is None or k.endswith(("weight", "bias")) else v[:0] for k, v in inputs.items()}
    loss, grads = run(empty, target[:0], backend=backend)
    assert loss.item() == 0 and grads[0].shape == (0, 16) and not grads[1].any()


@pytest.mark.parametrize("mode", [("forward_kl", "none"), ("reverse_kl", "bucket"), ("jsd", "bucket")], ids="-".join)
def test_sparse_teacher(backend, mode):
    """A student layer against offline top-k log-probabilities: kd_loss with teacher_topk on the
    materialized logits, chunk by chunk."""
    divergence, tail = mode
    inputs, target = problem(lead=(3, 7), v=300)
    student = {k: v for k, v in inputs.items() if k.startswith("student")}
    gen = torch.Generator().manual_seed(8)
    indices = torch.rand(3, 7, 300, generator=gen).argsort(-1)[..., :20].to(DEVICE)
    log_p = torch.log_softmax(F.linear(inputs["teacher_hidden"], inputs["teacher_weight"]), -1)
    topk = (indices, log_p.gather(-1, indices))
    check(student, target, backend, chunk_size=4, teacher_topk=topk, tail=tail, divergence=divergence,
          temperature=2.0)  # fmt: skip
    module = fastkd.FusedLinearKDLoss(tail=tail, divergence=divergence, temperature=2.0, chunk_size=4)
    got = module(student["student_hidden"], student["student_weight"], target=target,
                 student_bias=student["student_bias"], teacher_topk=topk)  # fmt: skip
    want, _ = run(student, target, teacher_topk=topk, tail=tail, divergence=divergence, temperature=2.0)
    assert torch.equal(got, want)


def test_teacher_gets_no_gradient_and_hidden_only():
    inputs, target = problem(bias=False)
    teacher_weight = inputs["teacher_weight"].clone().requires_grad_()
    hidden = inputs["student_hidden"].clone().requires_grad_()
    loss = fastkd.fused_linear_kd_loss(hidden, inputs["student_weight"], inputs["teacher_hidden"], teacher_weight,
                                       target, chunk_size=5)  # fmt: skip
    loss.backward()
    assert teacher_weight.grad is None and hidden.grad is not None
    _, (want, _, _) = exact(inputs, target)
    assert_close(2 * hidden.grad, want, torch.float32)


def test_default_chunk_size(monkeypatch):
    """From V and the free memory: a budget of 4 rows' buffers gives chunks of 4 rows, the same loss."""
    from fastkd.backends import torch as torch_backend
    from fastkd.backends import triton as triton_backend

    cpu = torch.device("cpu")
    kernels, reference_bytes = triton_backend.WORKSPACE_BYTES_PER_ENTRY, torch_backend.WORKSPACE_BYTES_PER_ENTRY
    assert fused_linear.default_chunk_size(10**6, 128256, torch.bfloat16, cpu, kernels) <= 700
    assert fused_linear.default_chunk_size(5, 10, torch.float32, cpu, reference_bytes) == 5  # never more than N
    assert fused_linear.default_chunk_size(5, 10**12, torch.float32, cpu, reference_bytes) == 1  # never less than 1
    inputs, target = problem()
    whole, _ = run(inputs, target)
    walked = []
    original = fused_linear._chunk_loss
    per_entry = fused_linear.ENTRY_FACTOR * 4 + reference_bytes  # float32 on the torch backend
    monkeypatch.setattr(fused_linear, "CHUNK_BUDGET", 4 * 101 * per_entry)
    monkeypatch.setattr(fused_linear, "_chunk_loss", lambda s, *a: walked.append(len(s)) or original(s, *a))
    loss, _ = run(inputs, target, backend="torch")
    assert walked[:2] == [4, 4] and sum(walked) == 23
    assert_close(loss, whole.double(), torch.float32)


def test_backward_runs_once():
    inputs, target = problem()
    hidden = inputs["student_hidden"].clone().requires_grad_()
    loss = fastkd.fused_linear_kd_loss(hidden, inputs["student_weight"], inputs["teacher_hidden"],
                                       inputs["teacher_weight"], target)  # fmt: skip
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        loss.backward()


def test_module():
    inputs, target = problem()
    t = torch.tensor(2.0, device=DEVICE)
    module = fastkd.FusedLinearKDLoss(temperature=t, alpha=0.8, divergence="jsd", chunk_size=4)
    assert "temperature" in dict(module.named_buffers()) and "chunk_size=4" in repr(module)
    got = module(inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"],
                 inputs["teacher_weight"], target, inputs["student_bias"], inputs["teacher_bias"])  # fmt: skip
    want, _ = run(inputs, target, fused=False, temperature=2.0, alpha=0.8, divergence="jsd")
    assert_close(got, want.double(), torch.float32)


I, Y = problem()


def _with(**changes):
    return {**I, **changes}


@pytest.mark.parametrize(
    "inputs, options, error, match",
    [
        (_with(student_weight=I["student_weight"][:, :5]), {}, ValueError, "student_weight must be .V, H."),
        (_with(teacher_weight=I["teacher_weight"][:50]), {}, ValueError, "teacher_weight has 50 classes"),
        (_with(student_bias=I["student_bias"][:5]), {}, ValueError, "student_bias must be .V,."),
        (_with(teacher_hidden=I["teacher_hidden"][:5]), {}, ValueError, "teacher_hidden must have student_hidden"),
        (_with(student_weight=I["student_weight"].double()), {}, TypeError, "student_weight dtype torch.float64"),
        (_with(student_hidden=I["student_hidden"].long()), {}, TypeError, "student_hidden must be a floating"),
        (I, dict(chunk_size=0), ValueError, "chunk_size must be >= 1"),
        (I, dict(inplace_grad=True), TypeError, "unexpected keyword argument.*inplace_grad"),
        (I, dict(temperature=0.0), ValueError, "temperature must be finite and > 0"),
        (I, dict(alpha=0.5, target=None), ValueError, "target=None"),
        (I, dict(target=Y[:4]), ValueError, "target must have the logits' shape"),
        (_with(teacher_hidden=None), {}, ValueError, "pass the teacher's layer"),
        (I, dict(teacher_topk=(Y[:, None].clamp(min=0), I["student_hidden"][:, :1])), ValueError, "not both"),
        (I, dict(tail="bucket"), ValueError, "tail applies to a sparse teacher"),
    ],
)
def test_bad_input(inputs, options, error, match):
    target = options.pop("target", Y)
    with pytest.raises(error, match=match):
        fastkd.fused_linear_kd_loss(inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"],
                                    inputs["teacher_weight"], target, student_bias=inputs["student_bias"],
                                    **options)  # fmt: skip


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU's high-water mark; CUDA memory is the benchmark's")
def test_peak_memory_is_below_the_materialized_logits():
    """At 8192 x 16000 (H = 256, float32; the logits' 524 MB above the chunks' 512 MB budget, which the
    kernels' chunk fills) the fused loss, at its default chunk size, takes well under half the memory of
    kd_loss on materialized logits: each measured in a fresh process (benchmarks/memory.py)."""
    from benchmarks.memory import peak_cpu

    fused = peak_cpu("fused_linear", "fastkd", 8192, 16000, torch.float32)
    materialized = peak_cpu("fused_linear", "materialized", 8192, 16000, torch.float32)
    logits = 8192 * 16000 * 4
    assert materialized > 2 * logits and fused < materialized / 2, (fused, materialized)
