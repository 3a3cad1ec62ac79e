"""Is a tensor a whole local tensor, or a piece of a sharded one? The check that keeps the fused-linear
loss from computing a wrong loss on the shard of a weight read outside its module's forward.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) a parameter outside the forward of the module that
owns it is a ``DTensor`` sharded over the mesh: ``Shard(0)`` of a (V, H) head holds V / P rows on each of
the P ranks (V = 101 over 2 ranks: rows [0, 51) and [51, 101)); its ``shape`` still says (V, H). Inside
that forward FSDP2 has all-gathered it and the module holds the whole (V, H) as a plain tensor, whose
gradient FSDP2 reduce-scatters after the backward. A DeepSpeed ZeRO-3 parameter outside its forward is
an empty placeholder (``ds_status`` NOT_AVAILABLE, the real shape in ``ds_shape``). Neither is a weight
the loss can use: a DTensor fails inside the matmul (``aten.mm`` "got mixed torch.Tensor and DTensor"),
and the gradient of a shard taken by hand would miss the other ranks' rows, or bypass FSDP's reduction.

This module imports nothing of fastkd (``fused_linear_kd_loss`` calls ``check_not_sharded`` first) and
does not import ``torch.distributed.tensor``: while that module is not loaded, no tensor can be a DTensor.
"""

from __future__ import annotations

import sys

import torch

SUPPORTED_WAY = (
    "Compute the loss inside the model's forward, where the weight is gathered: "
    "fastkd.fsdp.causal_lm_kd_loss(model, batch, teacher=...) for a causal LM (Hugging Face or alike), or "
    "fastkd.fsdp.head_kd_loss(head, hidden, ...) from code that already runs inside the model's forward "
    "(a teacher's weight is gathered for the call and freed after); see README, 'Sharded models (FSDP2)'"
)


def dtensor_type() -> type | None:
    """torch's ``DTensor`` class once ``torch.distributed.tensor`` is loaded; None before (no DTensor
    exists yet)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def sharded_reason(tensor: object) -> str | None:
    """What makes ``tensor`` a piece of a sharded tensor rather than a whole one, in words; None for an
    ordinary tensor (or anything else). Reads no tensor data and runs no collective."""
    dtensor = dtensor_type()
    if dtensor is not None and isinstance(tensor, dtensor):
        placements = ", ".join(repr(p) for p in tensor.placements)
        local = tuple(tensor.to_local().shape)
        return (f"a DTensor ({placements}) over a mesh of {tensor.device_mesh.size()} rank(s): of its shape "
                f"{tuple(tensor.shape)} this rank holds {local}, the parameter of an FSDP2 (fully_shard) or "
                "tensor-parallel module read outside that module's forward")  # fmt: skip
    if isinstance(tensor, torch.Tensor) and hasattr(tensor, "ds_id"):
        status = getattr(getattr(tensor, "ds_status", None), "name", None)
        if status != "AVAILABLE":
            shape = tuple(getattr(tensor, "ds_shape", tensor.shape))
            return (f"a DeepSpeed ZeRO-3 parameter not gathered here (ds_status {status}, shape {shape}, "
                    f"this rank holds {tuple(tensor.shape)}), read outside its module's forward")  # fmt: skip
    return None


def check_not_sharded(**tensors: object) -> None:
    """Raise a ``ValueError`` naming the first of ``tensors`` (keyword = the argument's name; None values
    are skipped) that is a shard of a sharded tensor (``sharded_reason``), and pointing to the supported
    way: the loss computed inside the model's forward. Whole tensors pass, at no cost.

        check_not_sharded(student_weight=model.lm_head.weight)   # outside an FSDP2 model's forward: raises
    """
    for name, tensor in tensors.items():
        reason = sharded_reason(tensor)
        if reason is not None:
            raise ValueError(f"{name} is {reason}; fused-linear KD needs the whole weight and would compute "
                             f"a wrong loss (or fail) on a shard. {SUPPORTED_WAY}")  # fmt: skip
