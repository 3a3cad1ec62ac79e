"""Distill a tiny language model into a smaller one with DDP and ``fastkd.FusedLinearKDLoss``.

    torchrun --nproc_per_node 2 examples/ddp_fused_linear_kd.py     # 2 processes (gloo on CPU, NCCL on GPUs)
    python examples/ddp_fused_linear_kd.py                          # 1 process, no torchrun

The models return their hidden states, not their logits: the loss takes each final layer's weight and
bias and computes KD + CE by chunks of rows, so the (tokens, vocab) logits are never formed. The
student's head weight goes into the loss as a tensor, not through ``head(...)``: its gradient still
comes from autograd, so DDP's hooks all-reduce it like any other (checked below, after a step). Keep
DDP's default ``find_unused_parameters=False`` (or ``static_graph=True``): with True, DDP finds no path
from the forward's output to the head, reduces it as unused, and the loss's gradient for it then raises
"marked as ready twice"; compute the loss inside the wrapped module's forward if you need that flag.
The data follow a noisy bigram rule (each token's successor is a fixed permutation of it, 80% of the
time); the teacher learns it first with plain cross-entropy.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import fastkd


class TinyLM(nn.Module):
    """Embedding -> residual MLP -> LayerNorm gives the hidden states; ``head`` would map them to logits."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab)  # never called in the KD loop: its weight goes to the loss

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, S) -> hidden states (B, S, H)
        x = self.embed(ids)
        return self.norm(x + self.mlp(x))


def bigram_data(n: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """(n, length) token sequences: next = perm[token] with probability 0.8, else a uniform token."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(vocab, generator=g)
    seqs = [torch.randint(vocab, (n,), generator=g)]
    for _ in range(length - 1):
        keep = torch.rand(n, generator=g) < 0.8
        seqs.append(torch.where(keep, perm[seqs[-1]], torch.randint(vocab, (n,), generator=g)))
    return torch.stack(seqs, 1)


def max_grad_difference(model: nn.Module) -> float:
    """Largest |grad on this rank - grad on any rank| over all parameters: 0 when DDP synced them all."""
    flat = torch.cat([p.grad.flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return max((g - flat).abs().max().item() for g in gathered)


def epochs(loader: DataLoader, sampler: DistributedSampler):
    """The loader's batches, epoch after epoch, each epoch a new shuffle (each rank its own share)."""
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        yield from loader


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40, help="student optimizer steps")
    p.add_argument("--teacher-steps", type=int, default=60, help="teacher pre-training steps (rank 0)")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--batch", type=int, default=16, help="sequences per rank and step")
    p.add_argument("--seq", type=int, default=32, help="tokens per sequence")
    p.add_argument("--hidden", type=int, default=32, help="student width")
    p.add_argument("--teacher-hidden", type=int, default=128)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the KD term; 1 - alpha for CE")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    if "WORLD_SIZE" in os.environ:  # torchrun: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment
        group = {}
    else:  # a plain `python` run: a group of one process, so that the same DDP code runs
        group = {"store": dist.HashStore(), "rank": 0, "world_size": 1}
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(args.device, local_rank) if args.device == "cuda" else torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **group)
    rank, world = dist.get_rank(), dist.get_world_size()
    data = TensorDataset(bigram_data(1024, args.seq + 1, args.vocab))

    # Teacher: trained on rank 0 with ordinary logits and CE, sent to every rank, then frozen.
    torch.manual_seed(0)
    teacher = TinyLM(args.vocab, args.teacher_hidden).to(device)
    if rank == 0:
        opt, loss = torch.optim.AdamW(teacher.parameters(), lr=1e-2), torch.tensor(float("nan"))
        for _ in range(args.teacher_steps):
            (seqs,) = data[torch.randint(len(data), (32,))]
            seqs = seqs.to(device)
            logits = teacher.head(teacher(seqs[:, :-1]))  # (32, S, V): small enough to form here
            loss = F.cross_entropy(logits.flatten(0, 1), seqs[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"teacher: CE {loss.item():.4f} after {args.teacher_steps} steps")
    for tensor in teacher.state_dict().values():
        dist.broadcast(tensor, src=0)
    teacher.eval().requires_grad_(False)

    # Student: DDP copies rank 0's initial parameters to every rank.
    student = TinyLM(args.vocab, args.hidden).to(device)
    model = DDP(student, device_ids=[device.index] if device.type == "cuda" else None)
    kd = fastkd.FusedLinearKDLoss(temperature=args.temperature, alpha=args.alpha)  # ignore_index=-100
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(data, batch_size=args.batch, sampler=sampler, drop_last=True)

    losses = []
    for step, (seqs,) in zip(range(args.steps), epochs(loader, sampler)):
        seqs = seqs.to(device)
        ids, target = seqs[:, :-1], seqs[:, 1:]  # causal LM: predict the next token
        with torch.no_grad():
            teacher_hidden = teacher(ids)
        hidden = model(ids)  # through the DDP wrapper, so DDP prepares this step's gradient sync
        loss = kd(hidden, student.head.weight, teacher_hidden, teacher.head.weight, target,
                  student_bias=student.head.bias, teacher_bias=teacher.head.bias)  # fmt: skip
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces every parameter's gradient here, the head's included
        if step in (0, args.steps - 1):
            diff = max_grad_difference(student)
            assert diff == 0.0, f"gradients differ across ranks by {diff}"
            if rank == 0:
                print(f"step {step}: gradients in sync across {world} rank(s), max |diff| = {diff}")
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step}: loss {losses[-1]:.4f}")

    if rank == 0:
        print(f"loss first={losses[0]:.6f} last={losses[-1]:.6f}")
    if dist.get_backend() == "gloo":
        # torch 2.13: a gloo worker thread frees a finished collective's tensors a moment after it returns,
        # and takes the GIL to do so; exiting within that moment aborts the process ("terminate called
        # without an active exception", about 1 run in 10 here). Releasing the GIL a while lets it finish.
        time.sleep(0.1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
