"""The distillation loss's keywords, checked once into one immutable ``KDOptions`` that every layer takes.

``KD_PARAMETERS`` lists the keywords once, with their defaults and types. ``kd_loss``, ``KDLoss``,
``fused_linear_kd_loss``, ``FusedLinearKDLoss`` and ``vocab_parallel_kd_loss`` take them as
``**kd_options`` and ``takes_kd_keywords`` spells them out in their signatures from that list (so
``help()``, ``inspect.signature`` and the IDEs that read it show them), refusing any other keyword as
Python would. ``KDOptions.checked`` runs the checks that read no tensor (a module's constructor runs
them); ``bind`` runs those that need the logits (a tensor temperature's shape and values) and gives
the options a backend takes. Under
``torch.compile`` the options cross a ``torch.library`` op as ``to_op()``: the two temperature tensors
and a string of the scalars, which ``from_op`` reads back.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
from dataclasses import dataclass
from inspect import Parameter

import torch
from torch import Tensor, nn

from fastkd._validate import (
    check_choice,
    check_classes,
    check_ignore_index,
    check_number,
    check_scalar_temperature,
    check_target,
    check_temperature,
)

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "ab", "dkd")
REDUCTIONS = ("mean", "sum", "batchmean", "none")
LOGIT_NORMS = (None, "standardize", "spherical")
VALUES_ARE = ("logprobs", "logits")
TAILS = ("none", "bucket")

# The loss's keywords, their defaults and types, in the order the signatures list them (kd_loss's
# docstring says what each means).
KD_PARAMETERS = tuple(
    Parameter(name, Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
    for name, default, annotation in (
        ("temperature", 1.0, "float | Tensor"),
        ("alpha", 0.5, "float"),
        ("divergence", "forward_kl", "str"),
        ("beta", 0.5, "float"),
        ("ignore_index", -100, "int"),
        ("reduction", "mean", "str"),
        ("temperature_squared", True, "bool"),
        ("teacher_temperature", None, "float | Tensor | None"),
        ("logit_norm", None, "str | None"),
        ("norm_scale", None, "float | None"),
        ("label_smoothing", 0.0, "float"),
        ("skew", 0.1, "float"),
        ("ab_alpha", 1.0, "float"),
        ("ab_beta", 0.0, "float"),
        ("dkd_alpha", 1.0, "float"),
        ("dkd_beta", 8.0, "float"),
        ("softcap", None, "float | None"),
        ("normalizer", None, "float | Tensor | None"),
        ("return_parts", False, "bool"),
    )
)
KD_DEFAULTS = {p.name: p.default for p in KD_PARAMETERS}


def takes_kd_keywords(fn):
    """Decorate ``fn``, which takes the loss's keywords as ``**kd_options`` (and may declare some of them
    itself, e.g. ``temperature`` and ``alpha`` as a module's first arguments): its signature spells out
    the others from ``KD_PARAMETERS`` in place of ``**kd_options``, and a keyword that is neither raises
    the ``TypeError`` Python would."""
    signature = inspect.signature(fn)
    own = [p for p in signature.parameters.values() if p.kind != Parameter.VAR_KEYWORD]
    added = [p for p in KD_PARAMETERS if p.name not in signature.parameters]
    allowed = {p.name for p in own} | {p.name for p in added}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for name in kwargs:
            if name not in allowed:
                raise TypeError(f"{fn.__qualname__}() got an unexpected keyword argument '{name}'")
        return fn(*args, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=own + added)
    return wrapper


class KDKeywords(nn.Module):
    """What a loss module keeps of its keywords: tensors as buffers (they follow ``.to()`` and
    ``state_dict``), the others in ``kd_options``; ``keywords()`` gives them all back."""

    def _keep(self, keywords: dict) -> None:
        self.kd_options = {k: v for k, v in keywords.items() if not isinstance(v, Tensor)}
        for name, value in keywords.items():
            if isinstance(value, Tensor):
                self.register_buffer(name, value)

    def keywords(self) -> dict:
        return {**self.kd_options, **dict(self.named_buffers(recurse=False))}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={'tensor' if isinstance(v, Tensor) else repr(v)}" for k, v in self.keywords().items())


@dataclass(frozen=True, eq=False)
class KDOptions:
    """``kd_loss``'s keywords after checking (see its docstring for their meaning).

    Temperatures are floats, or detached tensors of one value (0-d) or one per row (the logits' row
    shape before ``bind``, flattened to (N,) after, any stride); ``teacher_temperature`` is filled in
    (T by default), ``norm_scale`` defaulted (2). ``tail`` is the sparse teacher's ("none" for a dense
    one).
    """

    temperature: float | Tensor = 1.0
    alpha: float = 0.5
    divergence: str = "forward_kl"
    beta: float = 0.5
    ignore_index: int = -100
    reduction: str = "mean"
    temperature_squared: bool = True
    teacher_temperature: float | Tensor = 1.0
    logit_norm: str | None = None
    norm_scale: float = 2.0
    label_smoothing: float = 0.0
    skew: float = 0.1
    ab_alpha: float = 1.0
    ab_beta: float = 0.0
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    softcap: float | None = None
    normalizer: float | Tensor | None = None
    return_parts: bool = False
    tail: str = "none"

    @classmethod
    def checked(cls, **keywords) -> KDOptions:
        """The loss's ``keywords`` (``KD_PARAMETERS``; the defaults fill in the others) after the checks
        that read no tensor data: types, choices, ranges, float temperatures, combinations. A tensor
        temperature or normalizer is checked for its type here and for its shape and values by ``bind``."""
        v = {**KD_DEFAULTS, **keywords}
        check_number(v["alpha"], "alpha", 0.0, 1.0)
        check_choice(v["divergence"], DIVERGENCES, "divergence")
        divergence = v["divergence"]
        if divergence == "jsd":
            if isinstance(v["beta"], (int, float)) and not isinstance(v["beta"], bool) and v["beta"] in (0, 1):
                raise ValueError(f"beta={v['beta']} is an end of JSD's (0, 1), where the divergence vanishes: use "
                                 "divergence='forward_kl' (TRL's beta=0) or 'reverse_kl' (beta=1)")  # fmt: skip
            check_number(v["beta"], "beta", 0.0, 1.0, low_open=True, high_open=True)
        if divergence in ("skew_kl", "skew_reverse_kl"):
            check_number(v["skew"], "skew", 0.0, 1.0, high_open=True)
        if divergence == "ab":
            a = check_number(v["ab_alpha"], "ab_alpha", 0.0, math.inf, high_open=True)
            b = check_number(v["ab_beta"], "ab_beta", 0.0, math.inf, high_open=True)
            if a == b == 0:
                raise ValueError("ab_alpha = ab_beta = 0 is the log-L2 limit, which a class masked with -inf in one "
                                 "distribution makes infinite: pick ab_alpha or ab_beta > 0")  # fmt: skip
        if divergence == "dkd":
            check_number(v["dkd_alpha"], "dkd_alpha", 0.0, math.inf, high_open=True)
            check_number(v["dkd_beta"], "dkd_beta", 0.0, math.inf, high_open=True)
        check_choice(v["reduction"], REDUCTIONS, "reduction")
        check_choice(v["logit_norm"], LOGIT_NORMS, "logit_norm")
        if v["norm_scale"] is not None:
            if v["logit_norm"] != "spherical":
                raise ValueError(f"norm_scale applies to logit_norm='spherical', not logit_norm={v['logit_norm']!r}")
            check_number(v["norm_scale"], "norm_scale", 0.0, math.inf, low_open=True, high_open=True)
        check_number(v["label_smoothing"], "label_smoothing", 0.0, 1.0)
        if v["softcap"] is not None:
            check_number(v["softcap"], "softcap", 0.0, math.inf, low_open=True, high_open=True)
        for name in ("temperature_squared", "return_parts"):
            if not isinstance(v[name], bool):
                raise TypeError(f"{name} must be a bool, got {type(v[name]).__name__}")
        check_ignore_index(v["ignore_index"])
        temperature, teacher_temperature = v["temperature"], v["teacher_temperature"]
        check_scalar_temperature(temperature, "temperature")
        if teacher_temperature is not None:
            check_scalar_temperature(teacher_temperature, "teacher_temperature")
        if isinstance(temperature, Tensor) and temperature.requires_grad:
            raise ValueError("temperature: kd_loss does not differentiate wrt the temperature; pass temperature.detach()")
        normalizer = v["normalizer"]
        if normalizer is not None:
            if v["reduction"] == "none":
                raise ValueError("normalizer divides the summed loss; reduction='none' sums nothing: drop one of them")
            if isinstance(normalizer, Tensor):
                if normalizer.numel() != 1:
                    raise ValueError(f"normalizer must be a number or a one-element tensor, got shape "
                                     f"{tuple(normalizer.shape)}")  # fmt: skip
                normalizer = normalizer.detach().reshape(())
            else:
                normalizer = check_number(normalizer, "normalizer", 0.0, math.inf, low_open=True, high_open=True)
        return cls(
            temperature=float(temperature) if not isinstance(temperature, Tensor) else temperature,
            teacher_temperature=temperature if teacher_temperature is None else (
                float(teacher_temperature) if not isinstance(teacher_temperature, Tensor)
                else teacher_temperature.detach()),
            alpha=float(v["alpha"]), divergence=divergence, beta=float(v["beta"]), ignore_index=v["ignore_index"],
            reduction=v["reduction"], temperature_squared=v["temperature_squared"], logit_norm=v["logit_norm"],
            norm_scale=2.0 if v["norm_scale"] is None else float(v["norm_scale"]),
            label_smoothing=float(v["label_smoothing"]), skew=float(v["skew"]), ab_alpha=float(v["ab_alpha"]),
            ab_beta=float(v["ab_beta"]), dkd_alpha=float(v["dkd_alpha"]), dkd_beta=float(v["dkd_beta"]),
            softcap=None if v["softcap"] is None else float(v["softcap"]), normalizer=normalizer,
            return_parts=v["return_parts"],
        )  # fmt: skip

    def bind(self, logits: Tensor, target: Tensor | None, *, check_values: bool) -> KDOptions:
        """The options for ``logits`` (any leading dims, V classes last; only their shape, dtype and
        device are read) and ``target``: the target checked (shape, device; values when
        ``check_values``), ``target=None`` refused unless alpha = 1, tensor temperatures checked
        against the row shape (values when ``check_values``) and flattened to one per row."""
        check_classes(logits, "student_logits")
        if target is None:
            if self.alpha != 1:
                raise ValueError(f"target=None (pure distillation) needs alpha=1, got alpha={self.alpha}: no CE term "
                                 "to weigh")  # fmt: skip
            if self.divergence == "dkd":
                raise ValueError("divergence='dkd' needs a target: DKD splits each row at its target class")
        else:
            check_target(target, logits, self.ignore_index, check_values=check_values)
        replaced = {}
        if isinstance(self.normalizer, Tensor):
            normalizer = self.normalizer
            if normalizer.device != logits.device:
                if normalizer.device.type != "cpu":
                    raise ValueError(f"normalizer is on {normalizer.device} but the logits are on {logits.device}")
                normalizer = normalizer.to(logits.device)
            if check_values and not bool(torch.isfinite(normalizer) & (normalizer > 0)):
                raise ValueError(f"normalizer must be finite and > 0, got {normalizer.item()}")
            replaced["normalizer"] = normalizer
        dim = logits.dim() - 1
        temperatures = replaced
        for name in ("temperature", "teacher_temperature"):
            value = getattr(self, name)
            if isinstance(value, Tensor):
                value = check_temperature(value, logits, dim, check_values=check_values, name=name)
                temperatures[name] = value.reshape(-1) if value.dim() else value
        return dataclasses.replace(self, **temperatures)

    def rows(self, start: int, stop: int) -> KDOptions:
        """The options of rows [start, stop) (per-row temperatures sliced)."""
        sliced = {}
        for name in ("temperature", "teacher_temperature"):
            value = getattr(self, name)
            if isinstance(value, Tensor) and value.dim():
                sliced[name] = value[start:stop]
        return dataclasses.replace(self, **sliced) if sliced else self

    TENSOR_FIELDS = ("temperature", "teacher_temperature", "normalizer")  # fields that may hold a tensor

    def to_op(self) -> tuple[list[Tensor | None], str]:
        """([the ``TENSOR_FIELDS`` that hold tensors, None for the others], the other fields as
        ``name=repr;...``): the arguments of a ``torch.library`` op, whose schema has no dataclass.
        (``repr`` of floats, strings, bools and None, which ``torch.compile`` traces, as it does not
        ``json.dumps``.)"""
        tensors = [getattr(self, name) if isinstance(getattr(self, name), Tensor) else None for name in self.TENSOR_FIELDS]
        fields = [f.name for f in dataclasses.fields(self) if not isinstance(getattr(self, f.name), Tensor)]
        return tensors, ";".join(f"{name}={getattr(self, name)!r}" for name in fields)

    @classmethod
    def from_op(cls, tensors: list[Tensor | None], scalars: str) -> KDOptions:
        """The options ``to_op`` gave."""
        values = {name: ast.literal_eval(value) for name, value in (item.split("=", 1) for item in scalars.split(";"))}
        values |= {name: tensor for name, tensor in zip(cls.TENSOR_FIELDS, tensors) if tensor is not None}
        return cls(**values)

    @property
    def coefficient(self) -> float | Tensor:
        """The KD term's weight alpha c, c = T^2 (``temperature_squared``) or 1."""
        return self.alpha * (self.temperature**2 if self.temperature_squared else 1.0)


def check_sparse_options(options: KDOptions, values_are: str | None, tail: str | None) -> tuple[KDOptions, str]:
    """A sparse teacher's ``values_are`` and ``tail`` (None: "logprobs", "none") against each other and
    the options; returns (the options with ``tail``, ``values_are``). ``values_are`` matters to the
    value checks only: the math renormalizes the k entries either way (the tail bucket aside)."""
    values_are = "logprobs" if values_are is None else values_are
    tail = "none" if tail is None else tail
    check_choice(values_are, VALUES_ARE, "values_are")
    check_choice(tail, TAILS, "tail")
    if tail == "bucket" and values_are == "logits":
        raise ValueError("tail='bucket' needs values_are='logprobs': top-k logits do not say how much mass lies "
                         "outside the k entries")  # fmt: skip
    if options.divergence == "dkd":
        raise ValueError("divergence='dkd' needs dense teacher_logits: DKD's non-target distribution is not known "
                         "from k entries")  # fmt: skip
    reverse = {"reverse_kl": True, "skew_reverse_kl": options.skew == 0, "ab": options.ab_alpha == 0}
    if reverse.get(options.divergence) and tail == "none":
        raise ValueError(f"divergence={options.divergence!r} (weighing log(q / p) by the student's q) with "
                         "tail='none' is infinite wherever the student puts mass outside the teacher's k entries: "
                         "use tail='bucket' (or forward_kl / jsd)")  # fmt: skip
    if options.logit_norm is not None:
        raise ValueError(f"logit_norm={options.logit_norm!r} needs dense teacher_logits: the statistics of a row "
                         "are not known from k entries")  # fmt: skip
    return dataclasses.replace(options, tail=tail), values_are


def dense_teacher_only(values_are: str | None, tail: str | None, teacher: str) -> None:
    """A dense teacher takes neither ``values_are`` nor ``tail``."""
    for name, value in (("values_are", values_are), ("tail", tail)):
        if value is not None:
            raise ValueError(f"{name} applies to a sparse teacher (teacher_topk), not to {teacher}")

