"""Fused-linear KD with sharded models: the loss computed inside the model's forward, where FSDP2 has
gathered the head, so that it sees the whole (V, H) weight and its gradient goes through FSDP's reduction.

``fastkd.fused_linear_kd_loss`` takes each head's weight as a tensor. Under FSDP2 (``fully_shard``) a
parameter read outside the forward of the module that owns it is a DTensor shard (V / P rows of a (V, H)
head on each of P ranks; see ``fastkd.sharding``), so the loss must run where the weights are whole:

    call_in_forward(module, fn, *args)   = module(*args) with module's forward replaced by fn for this one
                                           call: every hook on module runs around fn as around its forward.
                                           FSDP2 all-gathers module's parameters before fn and, if fn's result
                                           needs a gradient, hooks the backward that reduce-scatters theirs;
                                           a DistributedDataParallel wrapper prepares its all-reduce.
    causal_lm_kd_loss(student, batch, teacher=teacher):
      1. h_t = teacher's last hidden states (B, S, H_t), as the teacher's forward, under no_grad; then every
         FSDP2 unit of the teacher is resharded (a root keeps its parameters whole after its forward, and
         a teacher never runs the backward that would free them)
      2. as the student's forward: h_s = its last hidden states (B, S, H), then
         head_kd_loss(lm_head, h_s[:, :-1], teacher's lm_head, h_t[:, :-1], labels[:, 1:])
    head_kd_loss(head, h_s, teacher_head, h_t, target):
         as head's forward (a head sharded as its own FSDP2 unit is gathered by its hooks): W_s, b_s as the
         head holds them now (whole: else a ValueError, see ``fastkd.sharding``); W_t, b_t gathered in
         h_t's dtype, autocast's under autocast (an all_gather of the shards of a DTensor, no gradient) for
         the call and freed when it returns; loss = FusedLinearKDLoss(h_s, W_s, h_t, W_t, target, b_s, b_t)
         (or a sparse teacher_topk)

The rows: position i of sequence b (i < S - 1) pairs the student's and teacher's hidden states at i with
labels[b, i + 1], the next token (``shift=True``; Hugging Face's convention, labels = input ids); a row
whose label is ``ignore_index`` (-100) counts in neither term. The loss is ``kd_loss``'s over these rows
(see ``fastkd.fused_linear``), the mean over this rank's counted rows by default. FSDP2 and DDP average
the parameters' gradients over the ranks, so the objective is the mean over ranks of each rank's loss
(as for any loss under DDP); each rank may hold a different number of rows.

Memory per rank while the loss runs, beyond FSDP2's own state: the student's head whole (V x H, FSDP2's
unsharded parameter, as in any forward through it), its gradient (V x H, float32 for half weights, formed
in the forward and handed to FSDP2's reduce-scatter in the backward), the teacher's head whole (V x H_t,
gathered for the loss only), and one chunk's logits (C x V, student and teacher): each head once, never
the (N, V) logits. Materializing the logits adds N x V for each of the student's logits, their gradient
and the teacher's logits (benchmarks/fsdp_memory.py measures both: on the CPU, float32, V = 32000, 2048
rows per rank, 684 MiB against 3763 MiB; at 4096 rows 740 against 7494).

Works with plain modules, ``DistributedDataParallel`` and FSDP2 (any layout: the head in the root's
group, as its own unit, or grouped with the final norm as accelerate does), in eager mode. Not supported:
FSDP1 (``FullyShardedDataParallel``), DeepSpeed ZeRO-3 (its placeholders are detected and refused with a
clear error), CPU-offloaded FSDP2 parameters, ``torch.compile``d models, and models that post-process
their logits (soft-capping, logit scales: refused).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

import fastkd
from fastkd.sharding import check_not_sharded, dtensor_type

# Config attributes by which some Hugging Face models transform the logits after the head (Gemma 2's
# soft-capping, Cohere's and Granite's scales, ...): the fused loss, which sees the head only, would miss it.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                    "lm_head_multiplier")  # fmt: skip


def _inner(module: nn.Module) -> nn.Module:
    """The module whose forward ``module(...)`` runs: a DistributedDataParallel wrapper's ``.module``."""
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(module, DistributedDataParallel):
        module = module.module
    return module


def call_in_forward(module: nn.Module, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, run as the forward of ``module``: ``module(*args, **kwargs)`` with the forward
    of ``module`` (of the module a ``DistributedDataParallel`` wraps) replaced by ``fn`` for this one call.

    Every hook on ``module`` runs around ``fn`` as around its forward: FSDP2 all-gathers the parameters of
    the units it enters before ``fn`` (``fn`` then reads them whole) and hooks the backward of ``fn``'s
    result, so that their gradients are reduce-scattered; DDP prepares its gradient all-reduce. The
    arguments go through the hooks too (FSDP2 may move them to the device, cast floating ones to its
    ``param_dtype``): pass the tensors ``fn`` differentiates through as arguments, and data that must not
    be cast by closure. The original forward is back in place while ``fn`` runs (``fn`` may call it) and
    after the call, whatever happens. A wrapper set on the instance's forward does not run: accelerate's
    mixed-precision wrapper (``torch.autocast`` around ``model.forward``) among them; enter the autocast
    around the call instead (``with accelerator.autocast(): ...``).
    """
    inner = _inner(module)
    sentinel = object()
    own = inner.__dict__.get("forward", sentinel)  # an instance-level forward (e.g. accelerate's wrapper)

    def restore() -> None:
        if own is sentinel:
            inner.__dict__.pop("forward", None)
        else:
            inner.__dict__["forward"] = own

    def forward(*fn_args: Any, **fn_kwargs: Any) -> Any:
        restore()
        return fn(*fn_args, **fn_kwargs)

    inner.__dict__["forward"] = forward
    try:
        return module(*args, **kwargs)
    finally:
        restore()


@contextlib.contextmanager
def gathered(tensor: Tensor | None, dtype: torch.dtype | None = None, name: str = "teacher_weight"
             ) -> Iterator[Tensor | None]:  # fmt: skip
    """The whole of ``tensor``, detached, for the ``with`` block: a DTensor's shards all-gathered over its
    mesh (a collective: every rank of the mesh must enter the block), cast to ``dtype`` before the gather;
    an ordinary tensor as it is (cast to ``dtype``); None as None. No gradient flows through it. The
    gathered copy is freed when the block ends, unless a reference to it is kept.

    For a teacher's weights only: a student's must be read inside the forward (``call_in_forward``), or
    its gradient would skip FSDP2's reduce-scatter.
    """
    if tensor is None:
        yield None
        return
    with torch.no_grad():
        whole = tensor.detach()
        if dtype is not None and whole.dtype != dtype:
            whole = whole.to(dtype)  # a DTensor casts shard by shard: the gather moves dtype's bytes
        dtensor = dtensor_type()
        if dtensor is not None and isinstance(whole, dtensor):
            whole = whole.full_tensor()
    check_not_sharded(**{name: whole})  # a DeepSpeed ZeRO-3 placeholder is not gathered here
    try:
        yield whole
    finally:
        del whole


def _weight_and_bias(head: nn.Module | Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    if head is None or isinstance(head, Tensor):
        return head, None
    return head.weight, getattr(head, "bias", None)


def _loss_fn(loss_fn: Callable[..., Tensor] | None, kd_kwargs: dict) -> Callable[..., Tensor]:
    if loss_fn is None:
        return fastkd.FusedLinearKDLoss(**kd_kwargs)
    if kd_kwargs:
        raise TypeError(f"pass either loss_fn or the loss's keywords ({', '.join(sorted(kd_kwargs))}), "
                        "not both")  # fmt: skip
    return loss_fn


def head_kd_loss(
    student_head: nn.Module,
    student_hidden: Tensor,
    teacher_head: nn.Module | Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    target: Tensor | None = None,
    *,
    teacher_topk: tuple[Tensor, Tensor] | None = None,
    loss_fn: Callable[..., Tensor] | None = None,
    **kd_kwargs: Any,
) -> Tensor:
    """The fused-linear KD loss of ``student_head`` (an ``nn.Linear``, V x H, bias or not) on
    ``student_hidden`` (..., H) against a teacher's head and hidden states (..., H_t) or a sparse
    ``teacher_topk`` (indices, values) (..., k), computed as the student head's forward.

    Call it where the student's model is in its forward (inside ``call_in_forward(model, ...)``, a
    Trainer's forward redirection such as TRL's ``DistillationTrainer._compute_loss``, or a model's own
    forward): the head's weight is then whole, in the root's FSDP2 group or, as the head's own unit (alone
    or grouped with the final norm), gathered by the hooks this call runs. ``teacher_head`` is an
    ``nn.Linear`` or a (V, H_t) weight, whole or a DTensor shard (gathered in ``teacher_hidden``'s dtype for
    the call, freed after; no gradient reaches it).

    ``loss_fn``: a ``fastkd.FusedLinearKDLoss`` (or a callable of its signature), or ``kd_kwargs`` to build
    one (``temperature``, ``alpha``, ``divergence``, ``beta``, ``ignore_index``, ``reduction``, ...,
    ``chunk_size``, ``values_are``, ``tail``). Returns its result: by default the mean over the rows whose
    ``target`` is not ``ignore_index``.

    Under ``torch.autocast`` (a Trainer's bf16 / fp16 mixed precision, entered by the caller: see
    ``call_in_forward``) the heads' matmuls run in the autocast dtype, as ``fused_linear_kd_loss`` runs
    them there; a sharded teacher head is gathered in that dtype.
    """
    loss_fn = _loss_fn(loss_fn, kd_kwargs)
    teacher_weight, teacher_bias = _weight_and_bias(teacher_head)

    def forward(hidden: Tensor) -> Tensor:
        weight, bias = student_head.weight, getattr(student_head, "bias", None)
        check_not_sharded(student_weight=weight, student_bias=bias)
        dtype = None if teacher_hidden is None else teacher_hidden.dtype
        device = hidden.device.type
        if torch.is_autocast_enabled(device) and dtype != torch.float64:  # the dtype the matmul will take
            dtype = torch.get_autocast_dtype(device)
        with gathered(teacher_weight, dtype) as whole_weight, \
                gathered(teacher_bias, dtype, "teacher_bias") as whole_bias:  # fmt: skip
            return loss_fn(hidden, weight, teacher_hidden, whole_weight, target, student_bias=bias,
                           teacher_bias=whole_bias, teacher_topk=teacher_topk)  # fmt: skip

    return call_in_forward(student_head, forward, student_hidden)


def _fsdp_module_type() -> type | None:
    module = sys.modules.get("torch.distributed.fsdp")  # not loaded: no model is sharded by FSDP2
    return getattr(module, "FSDPModule", None)


def reshard(model: nn.Module) -> None:
    """Free the whole parameters every FSDP2 unit of ``model`` holds (``FSDPModule.reshard``), leaving its
    shards: FSDP2 keeps a root's parameters after its forward (for the backward), and a teacher never
    runs the backward that would free them. Nothing for a model without FSDP2."""
    fsdp_module = _fsdp_module_type()
    if fsdp_module is not None:
        for module in _inner(model).modules():
            if isinstance(module, fsdp_module):
                module.reshard()


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(backbone, head) of a causal LM: for a Hugging Face model its ``base_model`` (the decoder, whose
    ``last_hidden_state`` is the head's input, final norm applied) and ``get_output_embeddings()``; else
    the attributes ``model`` (returning the last hidden states (B, S, H), or an output with
    ``last_hidden_state``) and ``lm_head``. Refuses a model that transforms its logits after the head."""
    inner = _inner(model)
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else getattr(inner, "lm_head", None)
    backbone = getattr(inner, "base_model", None)
    if backbone is None or backbone is inner:
        backbone = getattr(inner, "model", None)
    if not isinstance(backbone, nn.Module) or not isinstance(getattr(head, "weight", None), Tensor):
        raise TypeError(f"{type(inner).__name__} is not a causal LM fastkd can split into its backbone and "
                        "head: it needs a Hugging Face base_model and get_output_embeddings(), or the "
                        "attributes model (the last hidden states) and lm_head (an nn.Linear)")  # fmt: skip
    config = getattr(inner, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value is not None and value != 1:
            raise ValueError(f"{type(inner).__name__} transforms its logits after the head ({name}={value}); "
                             "the fused loss sees the head's output only and does not apply it")  # fmt: skip
    return backbone, head


def last_hidden_state(backbone: nn.Module, inputs: Mapping[str, Any]) -> Tensor:
    """The backbone's output (B, S, H): a tensor, an output's ``last_hidden_state`` or a tuple's first item.
    A Hugging Face backbone is called with ``use_cache=False`` (no KV cache in training)."""
    kwargs = dict(inputs)
    if hasattr(getattr(backbone, "config", None), "use_cache"):
        kwargs.setdefault("use_cache", False)
    out = backbone(**kwargs)
    if isinstance(out, Tensor):
        return out
    hidden = getattr(out, "last_hidden_state", None)
    return out[0] if hidden is None and isinstance(out, (tuple, list)) else hidden


def causal_lm_kd_loss(
    student: nn.Module,
    batch: Mapping[str, Any],
    *,
    teacher: nn.Module | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_head: nn.Module | Tensor | None = None,
    teacher_topk: tuple[Tensor, Tensor] | None = None,
    loss_fn: Callable[..., Tensor] | None = None,
    shift: bool = True,
    **kd_kwargs: Any,
) -> Tensor:
    """Fused-linear KD of a causal LM ``student`` (as the Trainer holds it: plain, FSDP2-sharded, or in a
    DDP wrapper) on ``batch``, computed inside its forward (module doc). The (B, S, V) logits are never
    formed.

    Args:
        batch: the models' inputs, (B, S) each (``input_ids``, ``attention_mask``, ...), and ``labels``
            (B, S), the token ids with ``ignore_index`` (-100) where no token counts; labels are not passed
            to the models. Without labels every row counts (pure distillation, ``alpha=1``).
        teacher: a causal LM of the student's vocabulary, plain or FSDP2-sharded, in the mode you want it
            in (``eval()``): its forward runs under no_grad, then its FSDP2 units are resharded.
        teacher_hidden, teacher_head: instead of ``teacher``, its last hidden states (B, S, H_t) at every
            input position and its head (``nn.Linear`` or (V, H_t) weight; a DTensor shard is gathered).
        teacher_topk: instead, a sparse teacher (indices, values) (B, S, k): its next-token distribution at
            every input position (the one the student's position predicts), as ``kd_loss`` takes it.
        loss_fn, **kd_kwargs: a ``fastkd.FusedLinearKDLoss``, or its keywords (``head_kd_loss``).
        shift: True pairs position i with labels[:, i + 1] (the last position has no row); False pairs it
            with labels[:, i] (labels already shifted).

    Returns ``loss_fn``'s result for this rank's rows: by default the mean over its counted rows.
    """
    given = {"teacher": teacher is not None, "teacher_hidden/teacher_head": teacher_hidden is not None or
             teacher_head is not None, "teacher_topk": teacher_topk is not None}  # fmt: skip
    if sum(given.values()) != 1:
        got = ", ".join(k for k, v in given.items() if v) or "none"
        raise ValueError("pass one teacher: teacher (a model), teacher_hidden with teacher_head, or "
                         f"teacher_topk; got {got}")  # fmt: skip
    if (teacher_hidden is None) != (teacher_head is None):
        raise ValueError("teacher_hidden and teacher_head go together: the teacher's last hidden states and "
                         "its head")  # fmt: skip
    loss_fn = _loss_fn(loss_fn, kd_kwargs)
    labels = batch.get("labels")
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    backbone, head = causal_lm_parts(student)
    if teacher is not None:
        teacher_backbone, teacher_head = causal_lm_parts(teacher)
        with torch.no_grad():
            teacher_hidden = call_in_forward(teacher, lambda **kw: last_hidden_state(teacher_backbone, kw),
                                             **inputs)  # fmt: skip
        reshard(teacher)
    rows = slice(None, -1) if shift else slice(None)

    def forward(**kw: Any) -> Tensor:
        hidden = last_hidden_state(backbone, kw)
        return head_kd_loss(
            head, hidden[:, rows], teacher_head, None if teacher_hidden is None else teacher_hidden[:, rows],
            None if labels is None else labels[:, 1:] if shift else labels,
            teacher_topk=None if teacher_topk is None else tuple(t[:, rows] for t in teacher_topk),
            loss_fn=loss_fn,
        )  # fmt: skip

    return call_in_forward(student, forward, **inputs)
