"""CalibrationMeter: streaming sums equal one pass over everything; state round-trips; gloo all-reduce."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import DEVICE

import fastkd


def _data(n=120, c=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * 3
    target = torch.randint(0, c, (n,), generator=g)
    target[::11] = -100
    return logits.to(DEVICE), target.to(DEVICE)


def _assert_same(a: fastkd.CalibrationStats, b: fastkd.CalibrationStats):
    assert torch.equal(a.bin_count.cpu(), b.bin_count.cpu()) and torch.equal(a.bin_correct.cpu(), b.bin_correct.cpu())
    torch.testing.assert_close(a.bin_confidence_sum.cpu(), b.bin_confidence_sum.cpu(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.nll_sum.cpu(), b.nll_sum.cpu(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.brier_sum.cpu(), b.brier_sum.cpu(), rtol=1e-12, atol=1e-12)


def test_batches_add_up(backend):
    logits, target = _data()
    meter = fastkd.CalibrationMeter(n_bins=10, backend=backend).to(DEVICE)
    expected = None
    for chunk in range(0, 120, 25):
        meter.update(logits[chunk : chunk + 25], target[chunk : chunk + 25])
        part = fastkd.calibration_stats(logits[chunk : chunk + 25], target[chunk : chunk + 25], 10, backend=backend)
        expected = part if expected is None else expected + part
    _assert_same(meter.compute(), expected)
    assert meter.compute().count == int((target != -100).sum())
    assert sum(t.numel() for t in meter.buffers()) == 3 * 10 + 2  # O(n_bins) state, no samples


def test_state_dict_resume_and_reset():
    logits, target = _data()
    meter = fastkd.CalibrationMeter(n_bins=8, backend="torch")
    meter.update(logits[:60], target[:60])
    resumed = fastkd.CalibrationMeter(n_bins=8, backend="torch")
    resumed.load_state_dict(meter.state_dict())
    resumed.update(logits[60:], target[60:])
    _assert_same(resumed.compute(), fastkd.calibration_stats(logits, target, 8, backend="torch"))
    resumed.reset()
    assert resumed.compute().count == 0
    with pytest.raises(RuntimeError, match="size mismatch"):
        fastkd.CalibrationMeter(n_bins=15).load_state_dict(meter.state_dict())


def test_dtype_casts_keep_the_state_exact():
    """A meter inside a model follows its device moves but not its dtype casts (float64 sums, int64 counts)."""
    logits, target = _data()
    model = torch.nn.Linear(4, 4)
    model.meter = fastkd.CalibrationMeter(n_bins=8, backend="torch")
    model.meter.update(logits[:60], target[:60])
    model.to(torch.bfloat16).half().float()
    assert model.weight.dtype == torch.float32
    assert [t.dtype for t in model.meter._state()] == [torch.int64] * 2 + [torch.float64] * 3
    model.meter.update(logits[60:], target[60:])
    _assert_same(model.meter.compute(), fastkd.calibration_stats(logits, target, 8, backend="torch"))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(n_bins=0), ValueError, "n_bins must be >= 1"),
        (dict(backend="cuda!"), ValueError, "backend must be one of"),
        (dict(temperature=-1.0), ValueError, "temperature must be in"),
        (dict(temperature=torch.ones(3)), ValueError, "one value for every batch"),
        (dict(ignore_index=None), TypeError, "ignore_index must be an int"),
        (dict(input="logprobs"), ValueError, "input must be one of"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastkd.CalibrationMeter(**kwargs)


def _worker(rank: int, world: int, store: str, queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        logits, target = _data(seed=0)
        meter = fastkd.CalibrationMeter(n_bins=12, backend="torch")
        meter.update(logits[rank::world], target[rank::world])  # each rank sees its share
        synced = meter.compute()
        again = meter.compute()  # a sync leaves the local state as it was: the same answer twice
        # numpy arrays pickle by value; torch tensors would be shared through this process's file
        # descriptors, which the parent fetches after this process may have exited.
        fields = [[t.cpu().numpy() for t in stats._fields()] for stats in (synced, again)]
        queue.put((rank, *fields, meter.bin_count.sum().item()))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_distributed_sync_over_gloo(tmp_path):
    world = 2
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    store = tmp_path / "store"  # a file rendezvous: no TCP port to race for
    procs = [ctx.Process(target=_worker, args=(rank, world, str(store), queue)) for rank in range(world)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    logits, target = _data(seed=0)
    expected = fastkd.calibration_stats(logits.cpu(), target.cpu(), 12, backend="torch")
    local_counts = []
    for _, synced, again, local_count in results:
        _assert_same(fastkd.CalibrationStats(*map(torch.from_numpy, synced)), expected)
        _assert_same(fastkd.CalibrationStats(*map(torch.from_numpy, again)), expected)
        local_counts.append(local_count)
    assert sum(local_counts) == expected.count and all(0 < n < expected.count for n in local_counts)
