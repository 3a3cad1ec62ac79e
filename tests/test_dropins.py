"""The drop-ins for TRL, Liger-Kernel and torchtune against float64 re-derivations of each peer's
formula (written here from their definitions), on the peers' own test shapes and options: loss and
gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_close

from fastkd import dropins


def tensor(*shape, seed=0, scale=1.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(DEVICE, dtype)


def generalized_jsd(student, teacher, labels, beta, temperature, reduction, num_items):
    """TRL's generalized JSD, re-derived: per element beta p log(p / m) + (1 - beta) q log(q / m) with
    m = beta p + (1 - beta) q (p the teacher's, q the student's softmax at T); beta 0 is KL(p || q),
    beta 1 KL(q || p); the elements of the tokens whose label is not -100, then the reduction."""
    log_q = F.log_softmax(student / temperature, -1)
    log_p = F.log_softmax(teacher / temperature, -1)
    p, q = log_p.exp(), log_q.exp()
    if beta == 0:
        terms = p * (log_p - log_q)
    elif beta == 1:
        terms = q * (log_q - log_p)
    else:
        log_m = (beta * p + (1 - beta) * q).log()
        terms = beta * p * (log_p - log_m) + (1 - beta) * q * (log_q - log_m)
    if labels is not None:
        terms = terms[labels != -100]
    if num_items is not None:
        return terms.sum() / num_items
    if reduction == "batchmean":
        return terms.sum() / (max(int((labels != -100).sum()), 1) if labels is not None else terms.shape[0])
    return terms.sum() if reduction == "sum" else terms.mean()


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("use_labels", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction, num_items", [("batchmean", None), ("sum", None), ("mean", None),
                                                  ("batchmean", 7)])  # fmt: skip
def test_trl_generalized_jsd_loss(backend, beta, use_labels, temperature, reduction, num_items):
    """TRL's test shapes (2, 3, 5) with its labels [[-100, 1, 2], [-100, -100, 3]]; and (4, 9, 300)."""
    for b, s, v in [(2, 3, 5), (4, 9, 300)]:
        student, teacher = tensor(b, s, v, seed=1, scale=2.0), tensor(b, s, v, seed=2, scale=2.0)
        labels = torch.tensor([[-100, 1, 2], [-100, -100, 3]]) if (b, s) == (2, 3) else tensor(b, s).gt(0).long()
        labels = torch.where(torch.arange(s) % 4 == 0, -100, labels).to(DEVICE) if (b, s) != (2, 3) else labels.to(DEVICE)
        labels = labels if use_labels else None
        x = student.clone().requires_grad_()
        got = dropins.generalized_jsd_loss(x, teacher, labels, beta=beta, temperature=temperature, reduction=reduction,
                                           num_items_in_batch=num_items)  # fmt: skip
        got.backward()
        xd = student.double().requires_grad_()
        want = generalized_jsd(xd, teacher.double(), labels, beta, temperature, reduction, num_items)
        want.backward()
        assert_close(got, want.detach(), torch.float32, scale=max(want.abs().item(), 1e-3))
        assert_close(x.grad, xd.grad, torch.float32)


def test_trl_refuses_elementwise():
    with pytest.raises(ValueError, match="reduction='none' gives TRL's element-wise"):
        dropins.generalized_jsd_loss(tensor(2, 5), tensor(2, 5, seed=1), reduction="none")


def liger_jsd(h, w, h_t, w_t, labels, b_s, b_t, weight_hard, weight_soft, beta, temperature, ignore_index):
    """Liger's fused-linear JSD, re-derived in float64: CE (T = 1) and generalized JSD at T (no T^2),
    each summed over the tokens whose label is not ``ignore_index`` and divided by their count."""
    z_s = F.linear(h, w, b_s)
    z_t = F.linear(h_t, w_t, b_t)
    keep = labels != ignore_index
    count = max(int(keep.sum()), 1)
    hard = F.cross_entropy(z_s, labels, ignore_index=ignore_index, reduction="sum") / count
    log_q, log_p = F.log_softmax(z_s / temperature, -1), F.log_softmax(z_t / temperature, -1)
    p, q = log_p.exp(), log_q.exp()
    if beta == 0:
        row = (p * (log_p - log_q)).sum(-1)
    elif beta == 1:
        row = (q * (log_q - log_p)).sum(-1)
    else:
        log_m = (beta * p + (1 - beta) * q).log()
        row = (beta * p * (log_p - log_m) + (1 - beta) * q * (log_q - log_m)).sum(-1)
    soft = torch.where(keep, row, 0.0).sum() / count
    return weight_hard * hard + weight_soft * soft, soft, hard


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.0, 1.0), (0.3, 1.2)])
@pytest.mark.parametrize("bias", [False, True])
def test_liger_fused_linear_jsd_loss(backend, beta, weights, bias):
    """Liger's test shapes: (B T, H) = (2 x 8, 16) hidden states, V = 100 (odd), teacher H = 24; labels
    with ignored tokens; temperature 2; return_soft_hard_loss."""
    n, h, h_t, v = 16, 16, 24, 100
    inputs = [tensor(n, h, seed=3), tensor(v, h, seed=4, scale=0.3), tensor(n, h_t, seed=5), tensor(v, h_t, seed=6, scale=0.3)]
    b_s, b_t = (tensor(v, seed=7), tensor(v, seed=8)) if bias else (None, None)
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(9)).to(DEVICE)
    labels[::5] = -100
    loss_fn = dropins.LigerFusedLinearJSDLoss(weight_hard_loss=weights[0], weight_soft_loss=weights[1], beta=beta,
                                              temperature=2.0, chunk_size=5, return_soft_hard_loss=True)  # fmt: skip
    leaves = [t.clone().requires_grad_(i < 2) for i, t in enumerate(inputs)]
    loss, soft, hard = loss_fn(*leaves, labels, b_s, b_t)
    loss.backward()
    exact = [t.double().requires_grad_(i < 2) for i, t in enumerate(inputs)]
    want = liger_jsd(*exact, labels, None if b_s is None else b_s.double(), None if b_t is None else b_t.double(),
                     *weights, beta, 2.0, -100)  # fmt: skip
    want[0].backward()
    for got, expected in zip((loss, soft, hard), want):
        assert_close(got, expected.detach(), torch.float32, scale=max(expected.abs().item(), 1.0))
    for got, expected in zip(leaves[:2], exact[:2]):
        assert_close(got.grad, expected.grad, torch.float32)


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
@pytest.mark.parametrize("use_labels", [False, True])
def test_liger_fused_linear_kl_div_loss(backend, reduction, use_labels):
    """KL(target || softmax(h W^T / T)) against cached probabilities (BT, V), as nn.KLDivLoss reduces it
    over the tokens not ignored; a target with exact zeros (0 log 0 = 0)."""
    n, h, v = 12, 8, 37
    hidden, weight = tensor(n, h, seed=10), tensor(v, h, seed=11, scale=0.5)
    target = torch.softmax(tensor(n, v, seed=12, scale=2.0), -1)
    target[:, :3] = 0.0
    target = (target / target.sum(-1, keepdim=True))
    labels = torch.arange(n, device=DEVICE) % v
    labels[1::4] = -100
    shift = labels if use_labels else None
    x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    got = dropins.LigerFusedLinearKLDivLoss(reduction=reduction, temperature=1.5)(x, w, target, shift)
    got.backward()
    xd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    log_q = F.log_softmax(F.linear(xd, wd) / 1.5, -1)
    p = target.double()
    rows = torch.where(p > 0, p * (p.log() - log_q), 0.0).sum(-1)
    keep = shift != -100 if use_labels else torch.ones(n, dtype=torch.bool, device=DEVICE)
    count = int(keep.sum())
    divisor = {"batchmean": count, "mean": count * v, "sum": 1}[reduction]
    want = torch.where(keep, rows, 0.0).sum() / divisor
    want.backward()
    assert_close(got, want.detach(), torch.float32, scale=max(want.abs().item(), 1e-3))
    assert_close(x.grad, xd.grad, torch.float32)
    assert_close(w.grad, wd.grad, torch.float32)


def torchtune_forward_kl(student, teacher, labels, ignore_index=-100, normalize=True):
    """torchtune's forward KL, re-derived: per token -sum_j p_t,j log p_s,j, summed over the tokens not
    ignored, divided by their count (0 when none) when ``normalize``."""
    per_token = -(F.softmax(teacher, -1) * F.log_softmax(student, -1)).sum(-1).reshape(-1)
    keep = labels.reshape(-1) != ignore_index
    total = torch.where(keep, per_token, 0.0).sum()
    if not normalize:
        return total
    return total / keep.sum() if keep.any() else total * 0


@pytest.mark.parametrize("normalize", [True, False])
def test_torchtune_forward_kl_loss(backend, normalize):
    """torchtune's test shapes: (B, S, V) = (2, 4, 10) with ignored labels; all ignored gives 0."""
    student, teacher = tensor(2, 4, 10, seed=13, scale=2.0), tensor(2, 4, 10, seed=14, scale=2.0)
    labels = torch.tensor([[1, -100, 3, 4], [-100, 2, 2, -100]], device=DEVICE)
    x = student.clone().requires_grad_()
    got = dropins.ForwardKLLoss()(x.reshape(8, 10), teacher.reshape(8, 10), labels, normalize=normalize)
    got.backward()
    xd = student.double().requires_grad_()
    want = torchtune_forward_kl(xd.reshape(8, 10), teacher.double().reshape(8, 10), labels, normalize=normalize)
    want.backward()
    assert_close(got, want.detach(), torch.float32, scale=max(want.abs().item(), 1.0))
    assert_close(x.grad, xd.grad, torch.float32)
    assert dropins.ForwardKLLoss()(student, teacher, torch.full_like(labels, -100)).item() == 0


def test_torchtune_chunked_output_loss(backend):
    """ForwardKLWithChunkedOutputLoss over 4 chunks of the sequence (tensor_split, as torchtune's recipe
    splits): the same loss and gradients as ForwardKLLoss over the whole."""
    student, teacher = tensor(2, 10, 50, seed=15, scale=2.0), tensor(2, 10, 50, seed=16, scale=2.0)
    labels = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(17)).to(DEVICE)
    labels[:, ::3] = -100
    x = student.clone().requires_grad_()
    chunks = list(x.tensor_split(4, dim=1))
    got = dropins.ForwardKLWithChunkedOutputLoss(num_output_chunks=4)(chunks, list(teacher.tensor_split(4, dim=1)),
                                                                      labels)  # fmt: skip
    got.backward()
    xd = student.double().requires_grad_()
    want = torchtune_forward_kl(xd.reshape(20, 50), teacher.double().reshape(20, 50), labels)
    want.backward()
    assert_close(got, want.detach(), torch.float32, scale=max(want.abs().item(), 1.0))
    assert_close(x.grad, xd.grad, torch.float32)
    assert math.isfinite(got.item())
