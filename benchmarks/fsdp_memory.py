"""Peak memory per rank of one distillation step under FSDP2, on the CPU: fused-linear KD inside the
student's forward (``fastkd.fsdp.causal_lm_kd_loss``) against the (tokens, vocab) logits materialized.

    python -m benchmarks.fsdp_memory                               # 2 gloo processes, a table
    python -m benchmarks.fsdp_memory --tokens 2048 --vocab 32000 --world 2

Both models are sharded as accelerate shards a causal LM (each decoder block a unit, the final norm and
the head one unit, the model the root) over ``--world`` gloo processes. A step is the teacher's forward
and the student's forward and backward on ``--tokens`` tokens per rank, JSD (beta = 0.5) as the loss:

    fastkd         causal_lm_kd_loss(student, batch, teacher=teacher, divergence="jsd", alpha=1)
    materialized   fastkd.kd_loss(student(batch) logits, teacher(batch) logits, divergence="jsd", alpha=1)
    eager          the same JSD in PyTorch ops on the logits (log_softmax, logaddexp, kl_div), as
                   TRL's GKDTrainer computes it

Each implementation runs in fresh processes; each rank measures as benchmarks/memory.py does: one step
(its one-time allocations), the gradients released, the peak resident set reset
(``/proc/self/clear_refs``), then a second step; the peak is VmHWM minus the resident size just before it,
with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed blocks go back to the system. Linux only.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import platform
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from benchmarks.memory import _status_bytes

IMPLS = ("fastkd", "materialized", "eager")
BETA = 0.5


class Block(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 4 * hidden), nn.GELU(),
                                 nn.Linear(4 * hidden, hidden))  # fmt: skip

    def forward(self, x):
        return x + self.mlp(x)


class Decoder(nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Block(hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class CausalLM(nn.Module):
    """A Hugging Face-like causal LM: ``model`` (the decoder) and ``lm_head`` (V x H, no bias)."""

    def __init__(self, vocab: int, hidden: int, layers: int):
        super().__init__()
        self.model = Decoder(vocab, hidden, layers)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids):
        return self.lm_head(self.model(input_ids))


def _shard(model: CausalLM, mesh) -> CausalLM:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model.model.embed, mesh=mesh)
    fully_shard([model.model.norm, model.lm_head], mesh=mesh, reshard_after_forward=False)
    return fully_shard(model, mesh=mesh)


def _eager_jsd(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    log_q, log_p = F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1)
    log_m = torch.logaddexp(log_p + math.log(BETA), log_q + math.log(1 - BETA))
    kl_pm = F.kl_div(log_m, log_p, log_target=True, reduction="batchmean")
    kl_qm = F.kl_div(log_m, log_q, log_target=True, reduction="batchmean")
    return BETA * kl_pm + (1 - BETA) * kl_qm


def _step(impl: str, student: CausalLM, teacher: CausalLM, ids: torch.Tensor) -> float:
    """One step: the teacher's forward, the student's forward and backward; returns the loss."""
    import fastkd
    from fastkd import fsdp

    if impl == "fastkd":
        loss = fsdp.causal_lm_kd_loss(student, {"input_ids": ids}, teacher=teacher, divergence="jsd",
                                      beta=BETA, alpha=1.0)  # fmt: skip
    else:
        with torch.no_grad():
            teacher_logits = teacher(ids)[:, :-1].flatten(0, 1)
        fsdp.reshard(teacher)
        logits = student(ids)[:, :-1].flatten(0, 1)
        if impl == "materialized":
            loss = fastkd.kd_loss(logits, teacher_logits, divergence="jsd", beta=BETA, alpha=1.0)
        else:
            loss = _eager_jsd(logits, teacher_logits)
        del teacher_logits, logits
    loss.backward()
    return loss.item()


def _worker(rank: int, world: int, store: str, impl: str, args: dict, queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        torch.set_num_threads(1)
        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(0)
        student = _shard(CausalLM(args["vocab"], args["hidden"], 2), mesh)
        teacher = _shard(CausalLM(args["vocab"], args["teacher_hidden"], 2).requires_grad_(False), mesh)
        g = torch.Generator().manual_seed(rank)
        ids = torch.randint(args["vocab"], (args["tokens"] // args["seq"], args["seq"] + 1), generator=g)
        _step(impl, student, teacher, ids)  # one-time allocations
        for p in student.parameters():
            p.grad = None
        gc.collect()
        dist.barrier()
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_bytes("VmRSS")
        loss = _step(impl, student, teacher, ids)
        peak = _status_bytes("VmHWM") - before
        queue.put((rank, {"peak_bytes": peak, "loss": loss}))
    except BaseException:
        queue.put((rank, traceback.format_exc()))
        raise
    finally:
        time.sleep(0.1)  # torch 2.13 + gloo: see examples/ddp_fused_linear_kd.py
        dist.destroy_process_group()


def measure(impl: str, args: dict, world: int = 2, timeout: float = 600) -> list[dict]:
    """Each rank's {"peak_bytes", "loss"} of one step of ``impl``, from ``world`` fresh gloo processes."""
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by the spawned processes' glibc at start
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_worker, args=(rank, world, f"{tmp}/store", impl, args, queue))
                 for rank in range(world)]  # fmt: skip
        for p in procs:
            p.start()
        results = {}
        try:
            for _ in procs:
                rank, result = queue.get(timeout=timeout)
                if isinstance(result, str):
                    raise RuntimeError(f"{impl}: rank {rank} failed:\n{result}")
                results[rank] = result
            for p in procs:
                p.join(timeout=60)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
    return [results[rank] for rank in range(world)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fsdp_memory",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank and step")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256, help="student width")
    parser.add_argument("--teacher-hidden", type=int, default=512)
    parser.add_argument("--world", type=int, default=2, help="gloo processes")
    parser.add_argument("--impl", choices=IMPLS, action="append", help="default: all")
    args = parser.parse_args(argv)
    shape = {"tokens": args.tokens, "seq": args.seq, "vocab": args.vocab, "hidden": args.hidden,
             "teacher_hidden": args.teacher_hidden}  # fmt: skip
    from benchmarks.runner import _git_commit

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    n, v = args.tokens // args.seq * args.seq, args.vocab
    mib = lambda entries: f"{entries * 4 / 2**20:.0f} MiB"  # noqa: E731 (float32)
    batch = f"{args.tokens // args.seq} x {args.seq + 1} tokens ({n} rows of the loss)"
    print(f"# One FSDP2 distillation step on the CPU, {args.world} gloo processes: peak memory per rank\n\n"
          f"{date}; {platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}; commit "
          f"{_git_commit()}; float32; per rank {batch}, V = {v}, student H = {args.hidden}, teacher H = "
          f"{args.teacher_hidden}, 2 blocks each; JSD (beta = {BETA}); each implementation in fresh "
          f"processes (benchmarks/fsdp_memory.py). For scale: the (rows, V) logits take {mib(n * v)}, "
          f"the student's head {mib(v * args.hidden)}, the teacher's {mib(v * args.teacher_hidden)}.\n")
    ranks = " | ".join(f"rank {r} peak MiB" for r in range(args.world))
    print(f"| implementation | {ranks} | loss |\n|---|{'---|' * args.world}---|")
    for impl in args.impl or IMPLS:
        results = measure(impl, shape, args.world)
        peaks = " | ".join(f"{r['peak_bytes'] / 2**20:.0f}" for r in results)
        print(f"| {impl} | {peaks} | {results[0]['loss']:.6f} |", flush=True)


if __name__ == "__main__":
    main()
