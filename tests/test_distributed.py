"""Vocab-parallel KD: two gloo processes on CPU, each holding an uneven shard of the vocabulary (V = 101 as
51 + 50), against ``kd_loss`` on the whole logits in one process (float64); one process without a
process group; bad input raising before any collective."""

from __future__ import annotations

import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TOL, assert_close

import fastkd
from fastkd import distributed, reference

V, SPLIT = 101, 51  # rank 0 holds columns [0, 51), rank 1 [51, 101)
LEAD = (2, 5)  # 10 rows
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]
NORMS = [None, "standardize", "spherical"]


def _tensor(*shape, seed=0, scale=3.0):
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _target(seed=0):
    """Random global targets, with rows whose target is on either side of the split (50 | 51), in the
    other rank's shard, and two ignored rows (1 and 6)."""
    y = torch.randint(0, V, LEAD, generator=torch.Generator().manual_seed(seed + 100))
    y.view(-1)[[0, 2, 3, 4, 5]] = torch.tensor([77, 3, SPLIT, SPLIT - 1, 15])
    y.view(-1)[[1, 6]] = -100
    return y


def _masked(divergence):
    """-inf entries: every 7th class in both (and every 9th from 1 in the teacher only, except for
    reverse KL, which is infinite there), row 5 masked over all of rank 1's columns, and an ignored
    padding row 6 of -inf only."""
    s, t = _tensor(*LEAD, V), _tensor(*LEAD, V, seed=1)
    for z in (s, t):
        z[..., ::7] = float("-inf")
        z.view(-1, V)[5, SPLIT:] = float("-inf")
        z.view(-1, V)[6] = float("-inf")
    if divergence != "reverse_kl":
        t[..., 1::9] = float("-inf")
    y = _target()
    y = torch.where((y % 7 == 0) & (y != -100), y + 1, y)  # no target on a masked class (CE = inf)
    return s, t, y


def _per_row(seed):
    return torch.rand(LEAD, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3 + 0.5


def _default_inputs():
    return _tensor(*LEAD, V), _tensor(*LEAD, V, seed=1), _target()


def _cases():
    """name -> () -> (student, teacher, target, options), float64 unless the options name a ``dtype``;
    a ``split`` other than ``SPLIT`` moves the boundary between the ranks' columns."""
    cases = {}

    def case(name, options, inputs=_default_inputs):
        cases[name] = lambda: (*inputs(), options() if callable(options) else dict(options))

    for divergence in DIVERGENCES:
        for norm in NORMS:
            case(f"{divergence}-{norm}", dict(temperature=2.0, alpha=0.7, divergence=divergence, beta=0.3,
                                              logit_norm=norm, label_smoothing=0.1))  # fmt: skip
        case(f"masked-{divergence}", dict(temperature=2.0, divergence=divergence, logit_norm="standardize"),
             lambda divergence=divergence: _masked(divergence))  # fmt: skip
    case("masked-none", dict(temperature=3.0, reduction="none"), lambda: _masked("forward_kl"))
    case("sum-reverse_kl", dict(reduction="sum", divergence="reverse_kl", temperature=0.5))
    case("none-jsd", dict(reduction="none", divergence="jsd", beta=0.9, label_smoothing=0.2))
    case("batchmean", dict(reduction="batchmean", temperature=4.0, alpha=0.2))
    case("per-row-temperatures", lambda: dict(temperature=_per_row(2), teacher_temperature=_per_row(3),
                                              logit_norm="spherical", norm_scale=5.0, reduction="none"))  # fmt: skip
    case("per-row-temperature-float-teacher",
         lambda: dict(temperature=_per_row(4), teacher_temperature=1.5, divergence="jsd"))  # fmt: skip
    case("tensor-temperature", lambda: dict(temperature=torch.tensor(2.5, dtype=torch.float64),
                                            temperature_squared=False))  # fmt: skip
    case("ce-only", dict(alpha=0.0, label_smoothing=0.1))
    for divergence, params in [("skew_kl", dict(skew=0.2)), ("skew_reverse_kl", dict(skew=0.3)), ("tvd", {}),
                               ("ab", dict(ab_alpha=0.7, ab_beta=0.5)), ("dkd", dict(dkd_alpha=1.0, dkd_beta=4.0))]:
        case(f"{divergence}-softcap", dict(temperature=2.0, alpha=0.6, divergence=divergence, softcap=4.0,
                                           logit_norm="standardize", **params))  # fmt: skip
    case("normalizer", dict(normalizer=7.0, temperature=2.0))
    case("pure-distillation", dict(alpha=1.0, temperature=2.0, logit_norm="standardize"),
         lambda: (_tensor(*LEAD, V), _tensor(*LEAD, V, seed=1), None))  # fmt: skip
    case("all-ignored", dict(logit_norm="spherical"),
         lambda: (_tensor(*LEAD, V), _tensor(*LEAD, V, seed=1), torch.full(LEAD, -100)))  # fmt: skip
    case("no-rows", dict(temperature=2.0),
         lambda: (_tensor(0, V), _tensor(0, V, seed=1), torch.zeros(0, dtype=torch.long)))  # fmt: skip
    case("rank-1-holds-no-column", dict(split=V, temperature=2.0, logit_norm="standardize", label_smoothing=0.1))
    case("float32", dict(dtype=torch.float32, temperature=2.0, divergence="jsd", logit_norm="standardize",
                         label_smoothing=0.1))  # fmt: skip
    case("bfloat16", dict(dtype=torch.bfloat16, temperature=2.0, divergence="reverse_kl", reduction="none"))
    for norm in ("standardize", "spherical"):
        # Normalizing scales these logits by ~1e3: the gradient's terms grow by that factor and must
        # cancel to float32 accuracy (a rank's mean rounded to float32 would spoil the merged M2).
        case(f"nearly-constant-{norm}",
             dict(dtype=torch.float32, alpha=1.0, temperature=2.0, divergence="jsd", logit_norm=norm),
             lambda: (_tensor(*LEAD, V, scale=1e-3) + _tensor(*LEAD, 1, seed=3),
                      _tensor(*LEAD, V, seed=1, scale=1e-2) - 2, None))  # fmt: skip
    return cases


CASES = _cases()
# Checks that read data raise after the first collective, on both ranks alike: a target past the
# global V (each shard is narrower than 60, which is accepted), a bad per-row temperature.
ERRORS = {
    "target-past-V": dict(target=torch.tensor([60, V])),
    "bad-per-row-temperature": dict(target=torch.tensor([60, 3]), temperature=torch.tensor([1.0, -1.0])),
}


def _inputs(name):
    """(student, teacher, target, options, split) of a case, the logits in the case's dtype."""
    student, teacher, target, options = CASES[name]()
    dtype, split = options.pop("dtype", torch.float64), options.pop("split", SPLIT)
    return student.to(dtype), teacher.to(dtype), target, options, split


def _backward(x, loss):
    """dL/dx of L = 2 * loss, or sum(w * loss) with random w for reduction "none"."""
    if loss.dim():
        weights = _tensor(*loss.shape, seed=7, scale=1.0).to(loss.dtype)
        (loss * weights).sum().backward()
    else:
        (2 * loss).backward()
    return x.grad


def _worker(rank: int, world: int, store: str, queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    counted = {"n": 0}
    for fn in ("all_gather", "all_reduce"):  # count the collectives of each call

        def counting(*args, _fn=getattr(dist, fn), **kwargs):
            counted["n"] += 1
            return _fn(*args, **kwargs)

        setattr(dist, fn, counting)
    try:
        group = dist.new_group([0, 1])
        results = {}
        for name in CASES:
            student, teacher, target, options, split = _inputs(name)
            columns = slice(0, split) if rank == 0 else slice(split, V)
            x = student[..., columns].clone().requires_grad_()
            counted["n"] = 0
            loss = distributed.vocab_parallel_kd_loss(x, teacher[..., columns], target,
                                                      group=group if "masked" in name else None, **options)  # fmt: skip
            n_collectives = counted["n"]
            grad = _backward(x, loss)
            with torch.no_grad():  # no gradient formed, the same loss
                again = distributed.vocab_parallel_kd_loss(x, teacher[..., columns], target, **options)
            # numpy arrays pickle by value (tensors would be shared through file descriptors); bfloat16
            # goes as float64, exactly.
            results[name] = (loss.detach().double().numpy(), grad.double().numpy(), str(loss.dtype), n_collectives,
                             torch.equal(again, loss.detach()))  # fmt: skip
        errors = {}
        for name, bad in ERRORS.items():
            kwargs = dict(bad)
            target = kwargs.pop("target")
            logits = _tensor(2, V)[:, :SPLIT] if rank == 0 else _tensor(2, V)[:, SPLIT:]
            try:
                distributed.vocab_parallel_kd_loss(logits, logits, target, **kwargs)
            except ValueError as error:
                errors[name] = str(error)
        queue.put((rank, results, errors))
    except BaseException:  # to the parent, which then stops the other rank (waiting in a collective)
        queue.put((rank, traceback.format_exc(), None))
        raise
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The results of every case on both ranks, from one spawn of two gloo processes."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not built")
    world = 2
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    store = tmp_path_factory.mktemp("gloo") / "store"  # a file rendezvous: no TCP port to race for
    procs = [ctx.Process(target=_worker, args=(rank, world, str(store), queue)) for rank in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            rank, *rest = queue.get(timeout=120)
            if isinstance(rest[0], str):
                pytest.fail(f"rank {rank} failed:\n{rest[0]}")
            results[rank] = rest
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return results


def _expected(name):
    """(loss, gradient) of ``kd_loss`` on the whole logits, in float64 (on the inputs as rounded)."""
    student, teacher, target, options, split = _inputs(name)
    x = student.double().requires_grad_()
    loss = reference.kd_loss(x, teacher.double(), target, **options)
    return loss.detach(), _backward(x, loss), student.dtype, split, options


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_kd_loss(two_ranks, name):
    (loss_0, grad_0, dtype, calls_0, same_0), (loss_1, grad_1, _, calls_1, same_1) = (
        two_ranks[rank][0][name] for rank in (0, 1)
    )
    want_loss, want_grad, in_dtype, split, options = _expected(name)
    assert dtype == str(reference.compute_dtype(in_dtype)) and grad_0.shape[-1] == split and grad_1.shape[-1] == V - split
    assert np.array_equal(loss_0, loss_1, equal_nan=True)  # the same loss on both ranks, bit for bit
    collectives = 2 if options.get("alpha", 0.5) == 0 else 4 if options.get("divergence") == "dkd" else 3
    assert calls_0 == calls_1 == collectives
    assert same_0 and same_1  # under no_grad
    loss, grad = torch.from_numpy(loss_0), torch.cat([torch.from_numpy(grad_0), torch.from_numpy(grad_1)], -1)
    assert loss.shape == want_loss.shape and grad.shape == want_grad.shape
    if in_dtype == torch.float64:
        scale = want_grad.nan_to_num(posinf=0, neginf=0).abs().max().item() if want_grad.numel() else 0.0
        torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12 * max(scale, 1e-3))
    else:
        # The loss is a difference of terms of about 1 per row; entries of dL/dx near 0 are measured
        # against the largest (as in tests/test_kd_loss.py).
        assert_close(loss, want_loss, in_dtype, scale=max(want_loss.abs().max().item(), 1.0))
        assert_close(grad, want_grad, in_dtype)


def test_two_ranks_edge_results(two_ranks):
    """Ignored rows: zero gradient on both ranks; a row masked over all of rank 1's columns: finite,
    zero gradient there; all rows ignored: loss 0."""
    results = {rank: two_ranks[rank][0] for rank in (0, 1)}
    for name in ("forward_kl-None", "masked-jsd"):
        for rank in (0, 1):
            loss, grad, *_ = results[rank][name]
            assert (grad.reshape(-1, grad.shape[-1])[[1, 6]] == 0).all()
            assert torch.isfinite(torch.from_numpy(loss)).all() and torch.isfinite(torch.from_numpy(grad)).all()
    masked_row = results[1]["masked-forward_kl"][1].reshape(-1, V - SPLIT)[5]
    assert (masked_row == 0).all() and (results[0]["masked-forward_kl"][1].reshape(-1, SPLIT)[5] != 0).any()
    for rank in (0, 1):
        loss, grad, *_ = results[rank]["all-ignored"]
        assert loss == 0 and (grad == 0).all()


def test_two_ranks_check_data_against_the_global_vocabulary(two_ranks):
    """Targets checked against V = 101, not a shard's width; both ranks raise the same error."""
    errors = [two_ranks[rank][1] for rank in (0, 1)]
    assert errors[0] == errors[1]
    assert "class index 101, outside [0, 101)" in errors[0]["target-past-V"]
    assert "temperature must be finite and > 0, got -1.0" in errors[0]["bad-per-row-temperature"]


@pytest.mark.parametrize(
    "options",
    [
        dict(temperature=2.0, divergence="jsd", logit_norm="standardize", label_smoothing=0.1),
        dict(reduction="none", divergence="reverse_kl", logit_norm="spherical"),
        dict(alpha=0.0, reduction="sum"),
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_one_process_equals_kd_loss(options, dtype):
    """Without a process group the call is kd_loss on the whole logits (P = 1)."""
    assert not dist.is_initialized()
    student, teacher, target = _tensor(*LEAD, V).to(dtype), _tensor(*LEAD, V, seed=1).to(dtype), _target()
    got = [student.clone().requires_grad_() for _ in range(2)]
    loss = distributed.vocab_parallel_kd_loss(got[0], teacher, target, **options)
    want = fastkd.kd_loss(got[1], teacher, target, backend="torch", **options)
    assert loss.dtype == reference.compute_dtype(dtype)
    rtol = 1e-12 if dtype == torch.float64 else TOL[dtype]
    torch.testing.assert_close(loss, want.detach(), rtol=rtol, atol=rtol)
    torch.testing.assert_close(_backward(got[0], loss), _backward(got[1], want), rtol=rtol, atol=rtol * 0.1)


class _Collective(Exception):
    pass


@pytest.fixture
def no_collective(monkeypatch):
    """A pretend P = 2 whose collectives raise: bad input must raise before reaching one."""

    def collective(*args, **kwargs):
        raise _Collective

    monkeypatch.setattr(distributed, "_world", lambda group: (0, 2))
    monkeypatch.setattr(dist, "all_gather", collective)
    monkeypatch.setattr(dist, "all_reduce", collective)


S, Y = _tensor(4, 51), torch.tensor([0, 100, -100, 60])  # a shard of a wider vocabulary; global targets


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((S, S, Y), dict(inplace_grad=True), TypeError, "unexpected keyword argument.*inplace_grad"),
        ((S, S, Y), dict(backend="torch", tau=2.0), TypeError, "unexpected keyword argument .backend."),
        ((S, torch.stack([S, S]), Y), {}, ValueError, "an ensemble of teachers is not supported"),
        ((S, S[:, :50], Y), {}, ValueError, "teacher_shard must have student_shard's shape"),
        ((S, S, Y), dict(temperature=0.0), ValueError, "temperature must be finite and > 0"),
        ((S, S, Y), dict(teacher_temperature=-1.0), ValueError, "teacher_temperature must be finite and > 0"),
        ((S, S, Y), dict(temperature=torch.ones(3)), ValueError, "temperature must be a scalar or hold one value"),
        ((S, S, Y), dict(temperature="2"), TypeError, "temperature must be a float or a tensor"),
        ((S, S, Y), dict(divergence="kl"), ValueError, "divergence must be one of"),
        ((S, S, Y[:3]), {}, ValueError, "target must have the logits' shape"),
        ((S, S, None), {}, ValueError, "target=None .* needs alpha=1"),
        ((S.long(), S, Y), {}, TypeError, "student_shard must be a floating-point tensor"),
    ],
)
def test_bad_input_raises_before_any_collective(no_collective, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        distributed.vocab_parallel_kd_loss(*args, **kwargs)


def test_good_input_reaches_the_collectives(no_collective):
    """The control of the test above: its pretend P = 2 does reach a collective."""
    with pytest.raises(_Collective):
        distributed.vocab_parallel_kd_loss(S, S, Y, temperature=2.0)


def test_data_checks_in_one_process():
    with pytest.raises(ValueError, match=r"class index 101, outside \[0, 101\)"):
        distributed.vocab_parallel_kd_loss(_tensor(2, V), _tensor(2, V), torch.tensor([0, 101]))
    with pytest.raises(ValueError, match="temperature must be finite and > 0, got -1.0"):
        distributed.vocab_parallel_kd_loss(_tensor(2, V), _tensor(2, V), torch.tensor([0, 1]),
                                           temperature=torch.tensor([1.0, -1.0]))  # fmt: skip
    with pytest.raises(ValueError, match="no process group initialized"):
        distributed.vocab_parallel_kd_loss(_tensor(2, V), _tensor(2, V), torch.tensor([0, 1]), group=object())
