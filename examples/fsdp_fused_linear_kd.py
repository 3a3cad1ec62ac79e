"""Distill a tiny language model into a smaller one with FSDP2 (``fully_shard``) and fused-linear KD, the
loss computed inside the student's forward by ``fastkd.fsdp.causal_lm_kd_loss``.

    torchrun --nproc_per_node 2 examples/fsdp_fused_linear_kd.py     # 2 processes: gloo on CPU, NCCL on GPUs
    python examples/fsdp_fused_linear_kd.py                          # 1 process, no torchrun

Both models are sharded: each decoder layer is an FSDP2 unit, and so is the model (the root: embedding,
final norm and, by default, the head). Outside the forward, ``lm_head.weight`` is a DTensor holding V / P
rows on each of the P ranks, which the loss cannot take as a weight (the script shows the error).
``causal_lm_kd_loss`` runs the teacher (under no_grad, then frees its gathered parameters), then the
student's backbone and the loss as the student's forward, where FSDP2 has gathered its head; the
teacher's head is all-gathered for the loss and freed after. The (tokens, vocab) logits are never formed.
``--layout`` shards the student's head as the root's (``root``), as its own unit (``head``) or with the
final norm (``tail``, as accelerate does); ``--teacher`` passes the teacher as a model, as its hidden
states and sharded head, or as offline top-k log-probabilities (``topk``, computed here from the teacher
as a server would store them). The data follow a noisy bigram rule (each token's successor is a fixed
permutation of it, 80% of the time), right-padded (label -100); the teacher learns it first with CE.
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
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import fastkd
from fastkd import fsdp, sharding


class Block(nn.Module):
    """x + MLP(LayerNorm(x)): a decoder layer without attention (the FSDP2 unit of the example)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 4 * hidden), nn.GELU(),
                                 nn.Linear(4 * hidden, hidden))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class Decoder(nn.Module):
    """Embedding -> residual MLP blocks -> LayerNorm: the last hidden states (B, S, H) (padding zeroed)."""

    def __init__(self, vocab: int, hidden: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Block(hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        if attention_mask is not None:
            x = x * attention_mask[..., None].to(x.dtype)
        return self.norm(x)


class TinyCausalLM(nn.Module):
    """The layout of a Hugging Face causal LM: ``model`` (the decoder) and ``lm_head``."""

    def __init__(self, vocab: int, hidden: int, layers: int):
        super().__init__()
        self.model = Decoder(vocab, hidden, layers)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.model(input_ids, attention_mask))  # the logits (teacher pre-training, top-k)


def shard(model: TinyCausalLM, layout: str, mesh) -> TinyCausalLM:
    """FSDP2: each decoder layer a unit; the head in the root's group (``root``), its own unit (``head``) or
    one unit with the final norm that keeps its parameters after the forward (``tail``, as accelerate)."""
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    if layout == "head":
        fully_shard(model.lm_head, mesh=mesh)
    elif layout == "tail":
        fully_shard([model.model.norm, model.lm_head], mesh=mesh, reshard_after_forward=False)
    return fully_shard(model, mesh=mesh)


def bigram_data(n: int, length: int, vocab: int, seed: int = 0) -> TensorDataset:
    """(n, length) sequences (next = perm[token] with probability 0.8, else uniform), right-padded to random
    lengths: input ids, attention mask, labels (-100 on the padding)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(vocab, generator=g)
    seqs = [torch.randint(vocab, (n,), generator=g)]
    for _ in range(length - 1):
        keep = torch.rand(n, generator=g) < 0.8
        seqs.append(torch.where(keep, perm[seqs[-1]], torch.randint(vocab, (n,), generator=g)))
    ids = torch.stack(seqs, 1)
    mask = (torch.arange(length) < torch.randint(length // 2, length + 1, (n, 1), generator=g)).long()
    ids = ids * mask
    return TensorDataset(ids, mask, ids.masked_fill(mask == 0, -100))


def epochs(loader: DataLoader, sampler: DistributedSampler):
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        yield from loader


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40, help="student optimizer steps")
    p.add_argument("--teacher-steps", type=int, default=60, help="teacher pre-training steps (rank 0)")
    p.add_argument("--vocab", type=int, default=257, help="odd: the heads' rows split unevenly over 2 ranks")
    p.add_argument("--batch", type=int, default=16, help="sequences per rank and step")
    p.add_argument("--seq", type=int, default=32, help="tokens per sequence")
    p.add_argument("--hidden", type=int, default=32, help="student width")
    p.add_argument("--teacher-hidden", type=int, default=128)
    p.add_argument("--layout", choices=("root", "head", "tail"), default="root",
                   help="the FSDP2 unit of the student's head")  # fmt: skip
    p.add_argument("--teacher", choices=("model", "hidden", "topk"), default="model",
                   help="how the teacher is given")  # fmt: skip
    p.add_argument("--topk", type=int, default=16, help="entries of the sparse teacher (--teacher topk)")
    p.add_argument("--divergence", choices=("forward_kl", "reverse_kl", "jsd"), default="forward_kl")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the KD term; 1 - alpha for CE")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    if "WORLD_SIZE" in os.environ:  # torchrun: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment
        group = {}
    else:  # a plain `python` run: a group of one process, so that the same FSDP2 code runs
        group = {"store": dist.HashStore(), "rank": 0, "world_size": 1}
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(args.device, local_rank) if args.device == "cuda" else torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **group)
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    data = bigram_data(1024, args.seq + 1, args.vocab)

    # Teacher: trained on rank 0 with ordinary logits and CE, sent to every rank, then sharded and frozen.
    torch.manual_seed(0)
    teacher = TinyCausalLM(args.vocab, args.teacher_hidden, 2).to(device)
    if rank == 0:
        opt, loss = torch.optim.AdamW(teacher.parameters(), lr=1e-2), torch.tensor(float("nan"))
        for _ in range(args.teacher_steps):
            ids, mask, labels = (t.to(device) for t in data[torch.randint(len(data), (32,))])
            logits = teacher(ids, mask)[:, :-1]  # (32, S, V): small enough to form here
            loss = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"teacher: CE {loss.item():.4f} after {args.teacher_steps} steps")
    for tensor in teacher.state_dict().values():
        dist.broadcast(tensor, src=0)
    teacher.eval().requires_grad_(False)
    shard(teacher, "root", mesh)

    # Student: the same initial parameters on every rank (same seed), then sharded.
    torch.manual_seed(1)
    student = shard(TinyCausalLM(args.vocab, args.hidden, 1).to(device), args.layout, mesh)
    weight = student.lm_head.weight
    if rank == 0:
        print(f"student lm_head.weight outside the forward: {type(weight).__name__} {weight.placements}, "
              f"{weight.to_local().shape[0]} of its {weight.shape[0]} rows on rank 0")  # fmt: skip
    try:  # the loss outside the forward, with the shard: refused (fused_linear_kd_loss does the same check)
        sharding.check_not_sharded(student_weight=weight)
    except ValueError as error:
        if rank == 0:
            print(f"outside the forward: ValueError: {str(error)[:120]}...")
    kd = fastkd.FusedLinearKDLoss(temperature=args.temperature, alpha=args.alpha, divergence=args.divergence,
                                  tail="bucket" if args.teacher == "topk" else None)  # fmt: skip
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(data, batch_size=args.batch, sampler=sampler, drop_last=True)

    losses = []
    for step, (ids, mask, labels) in zip(range(args.steps), epochs(loader, sampler)):
        batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
        if args.teacher == "model":
            loss = fsdp.causal_lm_kd_loss(student, batch, teacher=teacher, loss_fn=kd)
        elif args.teacher == "hidden":  # the teacher's hidden states computed here, its head passed sharded
            with torch.no_grad():
                hidden = fsdp.call_in_forward(teacher, teacher.model, batch["input_ids"],
                                              attention_mask=batch["attention_mask"])  # fmt: skip
            fsdp.reshard(teacher)
            loss = fsdp.causal_lm_kd_loss(student, batch, teacher_hidden=hidden, teacher_head=teacher.lm_head,
                                          loss_fn=kd)  # fmt: skip
        else:  # top-k log-probabilities of the teacher's next-token distribution, as a server stores them
            with torch.no_grad():
                logprobs = torch.log_softmax(teacher(batch["input_ids"], batch["attention_mask"]).float(), -1)
                values, indices = logprobs.topk(args.topk, -1)
            fsdp.reshard(teacher)
            loss = fsdp.causal_lm_kd_loss(student, batch, teacher_topk=(indices, values), loss_fn=kd)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # FSDP2 reduce-scatters every gradient, the head's included
        opt.step()
        if step == 0:
            assert isinstance(teacher.lm_head.weight, DTensor), "the teacher's gathered head was not freed"
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step}: loss {losses[-1]:.4f}")

    if rank == 0:
        print(f"{world} rank(s), {device.type}, layout {args.layout}, teacher {args.teacher}")
        print(f"loss first={losses[0]:.6f} last={losses[-1]:.6f}")
    if dist.get_backend() == "gloo":
        time.sleep(0.1)  # torch 2.13 + gloo: see examples/ddp_fused_linear_kd.py
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
