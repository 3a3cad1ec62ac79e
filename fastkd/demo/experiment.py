"""The demo's experiment: train teachers, calibrate them, distill students five ways, measure them all.

1. Teachers: per seed, a CNN trained to convergence with CE on the train split (over-confident, as
   Guo et al. found for networks trained this way). The next seed's teacher is a teacher of the same
   recipe trained independently: the fidelity control of Stanton et al. ("Does Knowledge
   Distillation Really Work?").
2. Calibration: ``fastkd.fit_temperature`` on the calibration split; test ECE / NLL before and after.
3. Students (an MLP ~40x smaller than the teacher), per seed, with the labels of the ``labeled`` train
   rows only: CE alone, and KD from the seed's teacher's logits on every train row four ways
   (``methods``).
4. Metrics on the test split: accuracy, ECE, NLL, Brier (``fastkd.calibration_stats``); top-1
   agreement and predictive KL with the teacher and with the independent teacher (``fastkd.fidelity``);
   and each model's own fitted temperature and its ECE once scaled by it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

import fastkd
from fastkd.demo import data
from fastkd.demo.models import (
    UNLABELED,
    TransferSetKD,
    logits_of,
    n_parameters,
    student_net,
    teacher_net,
    train,
)

TEACHER_LR, STUDENT_LR = 1e-3, 3e-3
KD_TEMPERATURE, KD_ALPHA = 4.0, 0.9
STANDARDIZED_TEMPERATURE = 2.0  # z-scored rows have unit spread: at T = 4 the targets are near uniform


@dataclass
class Config:
    dataset: str = "digits"
    data_root: str | None = None
    labeled: int | None = None  # labeled train rows for the students (None: the data set's default)
    seeds: int = 3
    epochs: int = 100  # each student's
    teacher_epochs: int = 100
    n_bins: int = 15
    device: str = "cpu"
    quiet: bool = False
    quick: bool = False  # a smoke test (``fastkd demo --quick``): the report gives no reading of its numbers


@dataclass
class Method:
    key: str
    label: str
    kd: dict | None  # fastkd.KDLoss keywords; None: CE on the labeled rows alone


def methods(teacher_temperature: float, teacher_norm: float) -> list[Method]:
    """The five student objectives, given the teacher's fitted T and its mean centred-logit norm."""
    kd = dict(temperature=KD_TEMPERATURE, alpha=KD_ALPHA)
    return [
        Method("ce", "CE only (no teacher)", None),
        Method("hinton", "Hinton KD", kd),
        # Yang & Song: the KD temperature replaced by the teacher's fitted one, on both sides.
        Method("calibrated", "KD, calibrated teacher",
               dict(kd, temperature=teacher_temperature, teacher_temperature=teacher_temperature)),
        Method("standardized", "Logit-standardized KD",
               dict(kd, temperature=STANDARDIZED_TEMPERATURE, logit_norm="standardize")),
        # Guo et al.: logits projected onto a sphere whose radius is the teacher's mean logit norm.
        Method("spherical", "Spherical KD", dict(kd, logit_norm="spherical", norm_scale=teacher_norm)),
    ]  # fmt: skip


METRICS = {  # key: what it is (the report's legend)
    "accuracy": "test top-1 accuracy",
    "ece": f"expected calibration error (L1, {Config.n_bins} equal bins)",
    "nll": "mean negative log-likelihood of the test labels",
    "brier": "mean multiclass Brier score",
    "confidence": "mean top-label confidence",
    "agreement": "top-1 agreement with the teacher",
    "kl": "predictive KL(p_teacher || p_student) at T = 1",
    "agreement_independent": "top-1 agreement with the independent teacher (same recipe, other seed)",
    "kl_independent": "predictive KL(p_independent || p_student)",
    "temperature": "the model's own temperature, fitted on the calibration split",
    "ece_scaled": "test ECE after scaling by that temperature",
}


def calibration_metrics(stats: fastkd.CalibrationStats, suffix: str = "") -> dict[str, float]:
    confidence = float(stats.bin_confidence_sum.sum()) / stats.count
    values = dict(accuracy=stats.accuracy, ece=stats.ece(), nll=stats.nll, brier=stats.brier, confidence=confidence)
    return {key + suffix: value for key, value in values.items()}


def fidelity_metrics(logits: Tensor, teacher: Tensor, suffix: str = "") -> dict[str, float]:
    result = fastkd.fidelity(logits, teacher)
    return {"agreement" + suffix: result.top1_agreement, "kl" + suffix: result.predictive_kl}


def summary(runs: list[dict]) -> dict:
    """``runs`` with the mean and sample standard deviation (None for one run) of each numeric metric."""
    keys = [key for key, value in runs[0].items() if isinstance(value, (int, float)) and not isinstance(value, bool)]
    mean = {key: statistics.fmean(run[key] for run in runs) for key in keys}
    std = {key: statistics.stdev(run[key] for run in runs) if len(runs) > 1 else None for key in keys}
    return {"runs": runs, "mean": mean, "std": std}


@dataclass
class TeacherOutputs:
    """A trained teacher's logits on each split, its fitted temperature and mean centred-logit norm."""

    train: Tensor
    cal: Tensor
    test: Tensor
    temperature: float = 1.0
    norm: float = 1.0


class Experiment:
    """Runs the steps of the module doc on ``Config``; ``results`` (JSON-ready) and ``stats``
    (``CalibrationStats`` per reliability diagram, pooled over seeds) fill in as they go.

    Seed s trains teacher s and the students distilled from it; teacher (s + 1) mod K (K = max(seeds,
    2) teachers) is its independent teacher of the same recipe.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.data = data.load(config.dataset, config.data_root, config.labeled).to(self.device)
        self.shape = tuple(self.data.x_train.shape[1:])
        self.n_classes = len(self.data.classes)
        self.results: dict = {"config": asdict(config), "data": {"name": self.data.name, **self.data.sizes}}
        self.stats: dict[str, fastkd.CalibrationStats] = {}

    def _pool(self, key: str, stats: fastkd.CalibrationStats) -> None:
        self.stats[key] = stats if key not in self.stats else self.stats[key] + stats

    def teachers(self) -> None:
        """Train K teachers, fit each one's temperature, measure each before and after, and each
        against the next one (the fidelity control)."""
        d, cfg = self.data, self.config
        every_row = torch.arange(len(d.y_train), device=self.device)
        self.teacher_outputs = []
        for k in range(max(cfg.seeds, 2)):
            torch.manual_seed(k)
            model = teacher_net(self.shape, self.n_classes).to(self.device)
            train(model, d.x_train, d.y_train, every_row, epochs=cfg.teacher_epochs, seed=k, lr=TEACHER_LR,
                  desc=f"teacher {k}", quiet=cfg.quiet)  # fmt: skip
            outputs = TeacherOutputs(logits_of(model, d.x_train), logits_of(model, d.x_cal), logits_of(model, d.x_test))
            centred = outputs.train - outputs.train.mean(-1, keepdim=True)
            outputs.norm = centred.norm(dim=-1).mean().item()
            self.teacher_outputs.append(outputs)
        runs = []
        for k, outputs in enumerate(self.teacher_outputs):
            before = fastkd.calibration_stats(outputs.test, d.y_test, cfg.n_bins)
            fit = fastkd.fit_temperature(outputs.cal, d.y_cal)
            outputs.temperature = float(fit)
            after = fastkd.calibration_stats(outputs.test, d.y_test, cfg.n_bins, temperature=outputs.temperature)
            other = self.teacher_outputs[(k + 1) % len(self.teacher_outputs)]
            runs.append({
                "train_accuracy": (outputs.train.argmax(-1) == d.y_train).double().mean().item(),
                **calibration_metrics(before),
                "temperature": outputs.temperature,
                "passes": fit.passes,
                "converged": fit.converged,
                "calibration_nll": fit.nll_initial,
                "calibration_nll_calibrated": fit.nll,
                **calibration_metrics(after, "_calibrated"),
                **fidelity_metrics(outputs.test, other.test, "_independent"),
            })  # fmt: skip
            if k < cfg.seeds:  # the teachers that students learn from
                self._pool("teacher", before)
                self._pool("teacher_calibrated", after)
        self.results["teacher"] = {"parameters": n_parameters(model), **summary(runs[: cfg.seeds])}
        m = self.results["teacher"]["mean"]
        self._log(
            f"teacher ({n_parameters(model):,} parameters; mean of {cfg.seeds}): train accuracy {m['train_accuracy']:.2%}, "
            f"test accuracy {m['accuracy']:.2%}, ECE {m['ece']:.2%}, NLL {m['nll']:.4f}\n"
            f"fit_temperature on the calibration split: T = {m['temperature']:.3f}; test ECE {m['ece']:.2%} -> "
            f"{m['ece_calibrated']:.2%}, NLL {m['nll']:.4f} -> {m['nll_calibrated']:.4f}\n"
            f"two teachers of the same recipe agree on {m['agreement_independent']:.2%} of the test inputs"
        )

    def students(self) -> None:
        """Train every method's student once per seed, from that seed's teacher, and measure it."""
        d, cfg = self.data, self.config
        partial = torch.full_like(d.y_train, UNLABELED)
        partial[d.labeled] = d.y_train[d.labeled]
        every_row = torch.arange(len(d.y_train), device=self.device)
        per_seed = [methods(t.temperature, t.norm) for t in self.teacher_outputs[: cfg.seeds]]
        self.results["students"] = {}
        for column in zip(*per_seed):  # one method, every seed
            runs = []
            for seed, method in enumerate(column):
                teacher = self.teacher_outputs[seed]
                independent = self.teacher_outputs[(seed + 1) % len(self.teacher_outputs)]
                torch.manual_seed(1000 + seed)
                model = student_net(self.shape, self.n_classes).to(self.device)
                options = dict(epochs=cfg.epochs, seed=seed, lr=STUDENT_LR, desc=f"{method.label} (seed {seed})",
                               quiet=cfg.quiet)  # fmt: skip
                if method.kd is None:
                    train(model, d.x_train, d.y_train, d.labeled, **options)
                else:
                    kd = TransferSetKD(**method.kd)
                    train(model, d.x_train, partial, every_row, teacher_logits=teacher.train, kd=kd, **options)
                logits = logits_of(model, d.x_test)
                stats = fastkd.calibration_stats(logits, d.y_test, cfg.n_bins)
                own = fastkd.fit_temperature(logits_of(model, d.x_cal), d.y_cal)
                runs.append({
                    **calibration_metrics(stats),
                    **fidelity_metrics(logits, teacher.test),
                    **fidelity_metrics(logits, independent.test, "_independent"),
                    "temperature": float(own),
                    "ece_scaled": fastkd.calibration_stats(logits, d.y_test, cfg.n_bins, temperature=float(own)).ece(),
                    "objective": "cross_entropy" if method.kd is None else {"KDLoss": method.kd},
                })  # fmt: skip
                self._pool(method.key, stats)
            result = self.results["students"][method.key] = {
                "label": method.label, "parameters": n_parameters(model), **summary(runs)
            }
            m = result["mean"]
            self._log(
                f"{method.label:<24} accuracy {m['accuracy']:.2%}  ECE {m['ece']:.2%}  NLL {m['nll']:.4f}  "
                f"agreement {m['agreement']:.2%}  KL {m['kl']:.4f}"
            )

    def _log(self, line: str) -> None:
        print(line, flush=True)

    def run(self) -> dict:
        start = time.perf_counter()
        self.teachers()
        self.students()
        self.results["seconds"] = time.perf_counter() - start
        return self.results
