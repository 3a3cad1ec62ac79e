"""The demo's networks and their training: a CNN teacher, an MLP student, and the student objectives.

A student sees the labels of only the ``labeled`` train rows; the distilled students also see the
teacher's logits on every train row (the transfer set of Hinton et al.). Their objective per row is

    alpha * c * D(p_t, p_s) + (1 - alpha) * CE(student, label)    on a labeled row,
    alpha * c * D(p_t, p_s)                                       on an unlabeled row,

averaged over the batch: ``fastkd.KDLoss`` on each group (``TransferSetKD``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastkd

BATCH_SIZE = 64
UNLABELED = -100  # fastkd's default ignore_index


def teacher_net(shape: tuple[int, int, int], n_classes: int, width: int = 32) -> nn.Sequential:
    """Conv(w)-Conv(w)-pool-Conv(2w)-pool-FC(256)-FC: ~96k parameters on 8x8 digits."""
    channels, height, width_px = shape
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * (height // 4) * (width_px // 4), 256), nn.ReLU(),
        nn.Linear(256, n_classes),
    )  # fmt: skip


def student_net(shape: tuple[int, int, int], n_classes: int, hidden: int = 32) -> nn.Sequential:
    """One hidden layer on the flattened image: ~2.4k parameters on 8x8 digits."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), hidden), nn.ReLU(), nn.Linear(hidden, n_classes))


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class TransferSetKD(nn.Module):
    """``fastkd.KDLoss`` over a batch of which only some rows have a label (the others: ``UNLABELED``).

    Labeled rows get ``KDLoss(**kd)``'s full per-row loss; unlabeled rows its distillation term alone
    (``alpha`` times ``KDLoss(alpha=1)``); the result is the mean over all rows.
    """

    def __init__(self, **kd) -> None:
        super().__init__()
        self.alpha = kd["alpha"]
        self.labeled = fastkd.KDLoss(**kd, reduction="sum")
        self.unlabeled = fastkd.KDLoss(**{**kd, "alpha": 1.0}, reduction="sum")

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
        has = target != UNLABELED
        loss = self.labeled(student_logits[has], teacher_logits[has], target[has])
        loss = loss + self.alpha * self.unlabeled(student_logits[~has], teacher_logits[~has])
        return loss / len(target)


def _batches(rows: Tensor, steps: int, gen: torch.Generator):
    """``steps`` batches of ``rows``, drawn from successive shuffles (each row once per shuffle)."""
    order = rows[:0]
    for _ in range(steps):
        if len(order) < BATCH_SIZE:
            order = torch.cat([order, rows[torch.randperm(len(rows), generator=gen).to(rows.device)]])
        batch, order = order[:BATCH_SIZE], order[BATCH_SIZE:]
        yield batch


def train(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    rows: Tensor,
    *,
    epochs: int,
    seed: int,
    lr: float,
    teacher_logits: Tensor | None = None,
    kd: TransferSetKD | None = None,
    desc: str = "",
    quiet: bool = False,
) -> nn.Module:
    """Adam on batches of ``rows`` of ``x`` for ``epochs`` passes' worth of steps over all of ``x``.

    Every model gets the same number of steps, ceil(len(x) / BATCH_SIZE) per epoch, whether it trains
    on the labeled rows alone (CE) or on all rows (``kd`` with ``teacher_logits``); ``target`` holds
    ``UNLABELED`` where a row's label is not used.
    """
    from tqdm.auto import tqdm  # the demo extra's: imported when a model trains, not with the command line

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(x) / BATCH_SIZE)
    batches = _batches(rows, epochs * steps_per_epoch, gen)
    model.train()
    # disable=None: bars on a terminal only, not in a log.
    for _ in tqdm(range(epochs), desc=desc, leave=False, disable=True if quiet else None, unit="epoch"):
        for _, batch in zip(range(steps_per_epoch), batches):
            logits = model(x[batch])
            if kd is None:
                loss = F.cross_entropy(logits, target[batch])
            else:
                loss = kd(logits, teacher_logits[batch], target[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def logits_of(model: nn.Module, x: Tensor, batch: int = 4096) -> Tensor:
    """The model's logits on ``x`` (N, K) float32, evaluated in batches."""
    model.eval()
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])
