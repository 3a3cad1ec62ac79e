"""The benchmark cases: each op of fastkd, its baselines, and the bytes that any implementation must move.

An implementation is a factory: given the case's inputs it returns a call that runs the op once (forward
and backward where the op has a gradient) and returns what it computed, so the tests can check that
every baseline computes the same thing as fastkd. Baselines compute in float32 like fastkd: low-precision
logits are cast up first, as a careful PyTorch user would.

Bytes per case, for N rows of V classes of ``b`` bytes (the int64 targets, N x 8, are left out):
    softmax   fwd+bwd    5 N V b   forward reads x, writes y; backward reads y and dy, writes dx
    kd_loss   fwd+bwd    3 N V b   reads student and teacher logits, writes the student's gradient
    jsd       fwd+bwd    3 N V b   likewise
    skew_kl, tvd         3 N V b   likewise
    ece       stats      1 N V b   reads the logits
    fit_temperature      1 N V b   one read of the logits: the least any method needs (fastkd reads
                                   them once per Newton pass, LBFGS once per function evaluation)
    fidelity  stats      2 N V b   reads the student's and the teacher's logits
    fused_linear         (3 N H + 3 V H) b   reads the student's and teacher's hidden states and weights,
                                   writes dL/dh and dL/dW (H = the hidden size; the logits need not
                                   move at all: this case is bound by its matmuls and read for its time
                                   and peak memory)

The ECE and temperature cases draw each row's label from softmax(logits / 2), so the fitted temperature
has a finite optimum near 2 (on labels independent of the logits it would run to its bound).
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

import fastkd

T_KD, ALPHA, BETA, N_BINS = 4.0, 0.5, 0.5, 15
LIGER = importlib.util.find_spec("liger_kernel") is not None
TORCHMETRICS = importlib.util.find_spec("torchmetrics") is not None

Factory = Callable[[dict], Callable[[], object]]


@dataclass
class Case:
    name: str
    title: str
    passes: int  # N x V x b multiples that must move
    make_inputs: Callable[[int, int, torch.dtype, torch.device], dict]
    impls: dict[str, Factory]
    needs_cuda: set[str] = field(default_factory=set)  # impls that run only on CUDA tensors
    compiled: set[str] = field(default_factory=set)  # impls under torch.compile (skipped in quick runs on CPU)
    max_elements_cpu: int = 1 << 25  # larger shapes are skipped on the CPU
    shapes: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # device type -> its own shapes
    about_memory: bool = False  # peak memory is the point: measured on the CPU too (a subprocess per
    # implementation) and plotted instead of GB/s
    bytes_of: Callable[[int, int, torch.dtype, torch.device], int] | None = None  # else passes x N V b

    def bytes_moved(self, rows: int, width: int, dtype: torch.dtype, device: torch.device) -> int:
        if self.bytes_of is not None:
            return self.bytes_of(rows, width, dtype, device)
        return self.passes * rows * width * dtype.itemsize


def _logits(rows: int, width: int, dtype: torch.dtype, device: torch.device, seed: int, scale: float = 4.0) -> Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return (scale * torch.randn(rows, width, generator=gen, device=device)).to(dtype)


def _target(rows: int, width: int, device: torch.device) -> Tensor:
    gen = torch.Generator(device=device).manual_seed(2)
    return torch.randint(0, width, (rows,), generator=gen, device=device)


def _fwd_bwd(loss_of: Callable[[Tensor, dict], Tensor]) -> Factory:
    """A factory whose call computes ``loss_of(student, inputs)`` and its gradient wrt the student."""

    def factory(inputs: dict) -> Callable[[], tuple[Tensor, Tensor]]:
        x = inputs["x"]

        def call():
            x.grad = None
            loss = loss_of(x, inputs)
            loss.backward(inputs.get("dy"))
            return loss.detach(), x.grad

        return call

    return factory


def _compiled(loss_of: Callable[[Tensor, dict], Tensor]) -> Factory:
    """``_fwd_bwd`` of ``loss_of`` under ``torch.compile``, compiled afresh for each shape and dtype (dynamo
    resets first, so no recompile limit turns it back to eager)."""

    def factory(inputs: dict):
        torch._dynamo.reset()
        return _fwd_bwd(torch.compile(loss_of, dynamic=False))(inputs)

    return factory


# --- softmax ------------------------------------------------------------------------------------------


def _softmax_inputs(rows, width, dtype, device):
    x = _logits(rows, width, dtype, device, 0).requires_grad_()
    return {"x": x, "dy": _logits(rows, width, dtype, device, 1, scale=1.0)}


def _softmax_eager(x, inputs):
    return torch.softmax(x / T_KD, dim=-1)


SOFTMAX = Case(
    "softmax", "tempered softmax, forward + backward (T = 4)", 5, _softmax_inputs,
    {
        "fastkd": _fwd_bwd(lambda x, inputs: fastkd.tempered_softmax(x, T_KD)),
        "eager": _fwd_bwd(_softmax_eager),
        "compiled": _compiled(_softmax_eager),
    },
    compiled={"compiled"},
)  # fmt: skip


# --- kd_loss: forward KL + CE -------------------------------------------------------------------------


def _kd_inputs(rows, width, dtype, device):
    return {
        "x": _logits(rows, width, dtype, device, 0).requires_grad_(),
        "teacher": _logits(rows, width, dtype, device, 1),
        "target": _target(rows, width, device),
    }


def _kd_eager(x, inputs):
    s, t = x.float(), inputs["teacher"].float()
    kl = F.kl_div(F.log_softmax(s / T_KD, -1), F.log_softmax(t / T_KD, -1), log_target=True, reduction="batchmean")
    return ALPHA * T_KD**2 * kl + (1 - ALPHA) * F.cross_entropy(s, inputs["target"])


@functools.cache
def _liger():
    from liger_kernel.transformers import LigerCrossEntropyLoss, LigerJSD, LigerKLDIVLoss

    return LigerKLDIVLoss(reduction="batchmean", log_target=True), LigerCrossEntropyLoss(), LigerJSD(beta=BETA)


def _kd_liger(x, inputs):
    kl_div, cross_entropy, _ = _liger()
    t = inputs["teacher"]
    kl = kl_div(F.log_softmax(x.float() / T_KD, -1), F.log_softmax(t.float() / T_KD, -1))
    return ALPHA * T_KD**2 * kl + (1 - ALPHA) * cross_entropy(x, inputs["target"])


KD_LOSS = Case(
    "kd_loss", f"KD loss: forward KL + CE, forward + backward (T = {T_KD:g}, alpha = {ALPHA})", 3, _kd_inputs,
    {
        "fastkd": _fwd_bwd(lambda x, i: fastkd.kd_loss(x, i["teacher"], i["target"], temperature=T_KD, alpha=ALPHA)),
        "eager": _fwd_bwd(_kd_eager),
        "compiled": _compiled(_kd_eager),
        "liger": _fwd_bwd(_kd_liger),
    },
    needs_cuda={"liger"},
    compiled={"compiled"},
)  # fmt: skip


# --- jsd ----------------------------------------------------------------------------------------------


def _jsd_eager(x, inputs):
    log_q, log_p = F.log_softmax(x.float(), -1), F.log_softmax(inputs["teacher"].float(), -1)
    log_m = torch.logaddexp(log_p + math.log(BETA), log_q + math.log(1 - BETA))
    kl_pm = F.kl_div(log_m, log_p, log_target=True, reduction="batchmean")
    kl_qm = F.kl_div(log_m, log_q, log_target=True, reduction="batchmean")
    return BETA * kl_pm + (1 - BETA) * kl_qm


def _jsd_liger(x, inputs):
    return _liger()[2](F.log_softmax(x.float(), -1), F.log_softmax(inputs["teacher"].float(), -1))


JSD = Case(
    "jsd", f"JSD (beta = {BETA}), forward + backward", 3, _kd_inputs,
    {
        "fastkd": _fwd_bwd(lambda x, i: fastkd.kd_loss(x, i["teacher"], divergence="jsd", beta=BETA, alpha=1.0)),
        "eager": _fwd_bwd(_jsd_eager),
        "compiled": _compiled(_jsd_eager),
        "liger": _fwd_bwd(_jsd_liger),
    },
    needs_cuda={"liger"},
    compiled={"compiled"},
)  # fmt: skip


# --- skew_kl, tvd: issue 18's divergences, priced beside forward KL and JSD ---------------------------

SKEW = 0.1


def _skew_kl_eager(x, inputs):
    """KL(p || s p + (1 - s) q) (DistiLLM), batchmean, in plain PyTorch."""
    log_q, log_p = F.log_softmax(x.float(), -1), F.log_softmax(inputs["teacher"].float(), -1)
    log_m = torch.logaddexp(log_p + math.log(SKEW), log_q + math.log1p(-SKEW))
    return F.kl_div(log_m, log_p, log_target=True, reduction="batchmean")


def _tvd_eager(x, inputs):
    """1/2 sum_j |p_j - q_j|, batchmean, in plain PyTorch."""
    q, p = F.softmax(x.float(), -1), F.softmax(inputs["teacher"].float(), -1)
    return 0.5 * (p - q).abs().sum(-1).mean()


SKEW_KL = Case(
    "skew_kl", f"skew KL (skew = {SKEW}), forward + backward", 3, _kd_inputs,
    {
        "fastkd": _fwd_bwd(lambda x, i: fastkd.kd_loss(x, i["teacher"], divergence="skew_kl", skew=SKEW, alpha=1.0)),
        "eager": _fwd_bwd(_skew_kl_eager),
        "compiled": _compiled(_skew_kl_eager),
    },
    compiled={"compiled"},
)  # fmt: skip

TVD = Case(
    "tvd", "total variation distance, forward + backward", 3, _kd_inputs,
    {
        "fastkd": _fwd_bwd(lambda x, i: fastkd.kd_loss(x, i["teacher"], divergence="tvd", alpha=1.0)),
        "eager": _fwd_bwd(_tvd_eager),
        "compiled": _compiled(_tvd_eager),
    },
    compiled={"compiled"},
)  # fmt: skip


# --- ece ----------------------------------------------------------------------------------------------


T_LABELS = 2.0  # labels drawn from softmax(logits / 2): a model over-confident by T = 2


def _ece_inputs(rows, width, dtype, device):
    """Logits and labels drawn from softmax(logits / T_LABELS) (the Gumbel-max trick, a chunk of rows at a
    time), so that the calibration error is that of a model over-confident by a known T."""
    logits = _logits(rows, width, dtype, device, 0)
    gen = torch.Generator(device=device).manual_seed(2)
    target = torch.empty(rows, dtype=torch.int64, device=device)
    step = max(1, (1 << 24) // width)
    for start in range(0, rows, step):
        chunk = logits[start : start + step].float() / T_LABELS
        gumbel = -torch.empty_like(chunk).exponential_(generator=gen).log()
        target[start : start + step] = (chunk + gumbel).argmax(-1)
    return {"logits": logits, "target": target}


def _ece_fastkd(inputs):
    return lambda: torch.tensor(fastkd.calibration_stats(inputs["logits"], inputs["target"], N_BINS, validate_args=False).ece())


def _ece_torchmetrics(inputs):
    from torchmetrics.functional.classification import multiclass_calibration_error

    logits, target = inputs["logits"], inputs["target"]
    return lambda: multiclass_calibration_error(logits.float().softmax(-1), target, logits.shape[-1], N_BINS,
                                                validate_args=False)  # fmt: skip


def _ece_plain(inputs):
    """softmax, max, bucketize, scatter_add: the ECE in plain PyTorch, bins ((m-1)/M, m/M] as fastkd's."""
    logits, target = inputs["logits"], inputs["target"]
    edges = torch.linspace(0, 1, N_BINS + 1, device=logits.device)[1:-1]

    def call():
        confidence, prediction = logits.float().softmax(-1).max(-1)
        bins = torch.bucketize(confidence, edges)
        conf_sum = torch.zeros(N_BINS, device=logits.device).scatter_add_(0, bins, confidence)
        correct = torch.zeros(N_BINS, device=logits.device).scatter_add_(0, bins, (prediction == target).float())
        return ((conf_sum - correct).abs().sum() / len(target)).cpu()

    return call


ECE = Case(
    "ece", f"ECE statistics ({N_BINS} bins)", 1, _ece_inputs,
    {"fastkd": _ece_fastkd, "torchmetrics": _ece_torchmetrics, "plain": _ece_plain},
)  # fmt: skip


# --- fit_temperature ----------------------------------------------------------------------------------


def _fit_fastkd(inputs):
    return lambda: torch.tensor(float(fastkd.fit_temperature(inputs["logits"], inputs["target"])))


def _fit_lbfgs(inputs):
    """Guo et al.'s reference: LBFGS(lr=0.01, max_iter=50) on the NLL of logits / T, from T = 1.5."""
    logits, target = inputs["logits"], inputs["target"]

    def call():
        temperature = torch.nn.Parameter(torch.full((1,), 1.5, device=logits.device))
        optimizer = torch.optim.LBFGS([temperature], lr=0.01, max_iter=50)

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(logits.float() / temperature, target)
            loss.backward()
            return loss

        optimizer.step(closure)
        return temperature.detach().cpu()[0]

    return call


FIT = Case(
    "fit_temperature", "temperature fit (NLL on the logits)", 1, _ece_inputs,
    {"fastkd": _fit_fastkd, "lbfgs": _fit_lbfgs},
    max_elements_cpu=1 << 23,
)  # fmt: skip

# --- fidelity -----------------------------------------------------------------------------------------

T_FIDELITY = 1.0


def _fidelity_inputs(rows, width, dtype, device):
    return {"student": _logits(rows, width, dtype, device, 0), "teacher": _logits(rows, width, dtype, device, 1)}


def _fidelity_fastkd(inputs):
    def call():
        result = fastkd.fidelity(inputs["student"], inputs["teacher"], temperature=T_FIDELITY, validate_args=False)
        return torch.tensor([result.top1_agreement, result.predictive_kl])

    return call


def _fidelity_plain(inputs):
    """Top-1 agreement and KL(teacher || student) in plain PyTorch: two log_softmaxes, argmaxes, kl_div."""
    student, teacher = inputs["student"], inputs["teacher"]

    def call():
        log_q = F.log_softmax(student.float() / T_FIDELITY, -1)
        log_p = F.log_softmax(teacher.float() / T_FIDELITY, -1)
        agree = (student.argmax(-1) == teacher.argmax(-1)).double().mean()
        kl = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean").double()
        return torch.stack([agree, kl]).float()

    return call


FIDELITY = Case(
    "fidelity", f"fidelity: top-1 agreement and KL(teacher || student) (T = {T_FIDELITY:g})", 2, _fidelity_inputs,
    {"fastkd": _fidelity_fastkd, "plain": _fidelity_plain},
)  # fmt: skip

# --- fused_linear: JSD of two final linear layers -------------------------------------------------------

HIDDEN = {"cuda": 4096, "cpu": 256}  # H of the student and the teacher


def _linear_inputs(rows, width, dtype, device):
    """Hidden states (N, H) and (V, H) weights of a student and a teacher whose logits spread over a few
    units; the student's hidden states and weight get gradients."""
    hidden = HIDDEN[device.type]
    scale = 3 * hidden**-0.5
    return {
        "x": _logits(rows, hidden, dtype, device, 0, scale=1.0).requires_grad_(),
        "weight": _logits(width, hidden, dtype, device, 1, scale=scale).requires_grad_(),
        "teacher_hidden": _logits(rows, hidden, dtype, device, 2, scale=1.0),
        "teacher_weight": _logits(width, hidden, dtype, device, 3, scale=scale),
    }


def _linear_fwd_bwd(loss_of: Callable[[dict], Tensor]) -> Factory:
    """A factory whose call computes ``loss_of(inputs)`` and its gradients wrt the student's hidden states
    and weight."""

    def factory(inputs: dict) -> Callable[[], tuple[Tensor, Tensor, Tensor]]:
        def call():
            inputs["x"].grad = inputs["weight"].grad = None
            loss = loss_of(inputs)
            loss.backward()
            return loss.detach(), inputs["x"].grad, inputs["weight"].grad

        return call

    return factory


def _linear_logits(inputs: dict) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        teacher = F.linear(inputs["teacher_hidden"], inputs["teacher_weight"])
    return F.linear(inputs["x"], inputs["weight"]), teacher


def _linear_eager(inputs):
    student, teacher = _linear_logits(inputs)
    return _jsd_eager(student, {"teacher": teacher})


def _linear_compiled(inputs: dict):
    torch._dynamo.reset()
    return _linear_fwd_bwd(torch.compile(_linear_eager, dynamic=False))(inputs)


@functools.cache
def _liger_linear():
    from liger_kernel.transformers import LigerFusedLinearJSD

    return LigerFusedLinearJSD(jsd_beta=BETA)


FUSED_LINEAR = Case(  # passes: unused, see bytes_of
    "fused_linear", f"fused-linear JSD (beta = {BETA}), H = {HIDDEN['cuda']} (CUDA) / {HIDDEN['cpu']} (CPU), "
    "fwd + bwd", 0, _linear_inputs,
    {
        "fastkd": _linear_fwd_bwd(lambda i: fastkd.fused_linear_kd_loss(i["x"], i["weight"], i["teacher_hidden"],
                                                                        i["teacher_weight"], divergence="jsd",
                                                                        beta=BETA, alpha=1.0)),
        "materialized": _linear_fwd_bwd(lambda i: fastkd.kd_loss(*_linear_logits(i), divergence="jsd", beta=BETA,
                                                                 alpha=1.0)),
        "eager": _linear_fwd_bwd(_linear_eager),
        "compiled": _linear_compiled,
        "liger": _linear_fwd_bwd(lambda i: _liger_linear()(i["x"], i["weight"], i["teacher_hidden"],
                                                           i["teacher_weight"])),
    },
    needs_cuda={"liger"},
    compiled={"compiled"},
    shapes={"cuda": [(4096, 32000), (8192, 128256), (16384, 131072)], "cpu": [(1024, 8000), (4096, 32000)]},
    max_elements_cpu=1 << 27,
    about_memory=True,
    bytes_of=lambda rows, width, dtype, device: 3 * (rows + width) * HIDDEN[device.type] * dtype.itemsize,
)  # fmt: skip

CASES = {case.name: case for case in (SOFTMAX, KD_LOSS, JSD, SKEW_KL, TVD, ECE, FIT, FIDELITY, FUSED_LINEAR)}


def available(case: Case, impl: str, device: torch.device) -> str | None:
    """None when ``impl`` can run here, else why not (the table's cell)."""
    if impl == "liger" and not LIGER:
        return "not installed"
    if impl == "torchmetrics" and not TORCHMETRICS:
        return "not installed"
    if impl in case.needs_cuda and device.type != "cuda":
        return "needs CUDA"
    return None
