"""fastkd.fsdp: fused-linear KD with FSDP2-sharded models, on 2 gloo processes, against a single-process
float64 run of the same models on materialized logits (``kd_loss``): the loss on each rank, the gradient
wrt each rank's student hidden states and the student's parameter shards (the head's rows 0-50 on rank 0,
51-100 on rank 1: V = 101), forward KL and JSD, dense, hidden-states-and-head and sparse top-k teachers,
the student's head in the root's FSDP2 group, in its own unit or grouped with the final norm (as
accelerate does), ignored rows and different row counts per rank (16 and 15); the teacher gets no
gradient and holds only its shards after a step. And the errors: a sharded weight passed to the loss
outside the forward names the weight and the supported way.
"""

from __future__ import annotations

import contextlib
import functools
import time
import traceback
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TOL, assert_close
from torch import nn

import fastkd
from fastkd import fsdp, sharding

V, H, H_T = 101, 16, 24
SHAPES = {0: (2, 9), 1: (3, 6)}  # (B, S) per rank: 2 x 8 = 16 and 3 x 5 = 15 rows after the shift
K = 5  # entries of the sparse teacher


class Layer(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)

    def forward(self, x):
        return x + torch.tanh(self.linear(x))


class Backbone(nn.Module):
    """Embedding -> 2 residual tanh layers -> LayerNorm: the last hidden states (B, S, H), as a Hugging Face
    decoder's ``last_hidden_state``; padded positions (attention_mask 0) are zeroed before the norm."""

    def __init__(self, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(V, hidden)
        self.layers = nn.ModuleList(Layer(hidden) for _ in range(2))
        self.norm = nn.LayerNorm(hidden)

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        if attention_mask is not None:
            x = x * attention_mask[..., None].to(x.dtype)
        return self.norm(x)


class TinyCausalLM(nn.Module):
    def __init__(self, hidden: int, bias: bool = False):
        super().__init__()
        self.model = Backbone(hidden)
        self.lm_head = nn.Linear(hidden, V, bias=bias)

    def forward(self, input_ids, attention_mask=None):  # the logits (B, S, V): the reference's way
        return self.lm_head(self.model(input_ids, attention_mask))


def make_models(bias: bool = False) -> tuple[TinyCausalLM, TinyCausalLM]:
    """The same student (H = 16) and teacher (H_t = 24) in every process, float32, logits of a few units."""
    torch.manual_seed(0)
    student, teacher = TinyCausalLM(H, bias), TinyCausalLM(H_T, bias)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(4.0)
    return student, teacher


def make_batch(rank: int, all_ignored: bool = False) -> dict:
    """Rank ``rank``'s batch: its own (B, S), right padding (attention 0, label -100) and a few more
    ignored labels."""
    b, s = SHAPES[rank]
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(V, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, s - 2 :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 2] = -100
    if all_ignored:
        labels[:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_topk(rank: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse teacher (B, S, K): distinct indices per position, log-probabilities summing below 1."""
    b, s = SHAPES[rank]
    g = torch.Generator().manual_seed(200 + rank)
    indices = torch.rand(b, s, V, generator=g).argsort(-1)[..., :K]
    values = torch.log_softmax(torch.randn(b, s, K + 1, generator=g, dtype=torch.float64) * 2, -1)[..., :K]
    return indices, values.to(dtype)


# name -> (student layout, teacher mode, bias, all rows of rank 1 ignored, FusedLinearKDLoss keywords).
# Layouts: "root" (the head in the root's group), "head" (the head its own unit), "tail" (final norm and
# head one unit that keeps its parameters after the forward, as accelerate shards), "ddp" (a DDP wrapper).
# Teachers: "root"/"head" (a model sharded so), "replicated" (a model not sharded), "hidden-head" (its
# hidden states and its sharded head given), "topk" (a sparse teacher).
CASES = {
    "forward_kl-root": ("root", "root", False, False, dict(temperature=2.0, alpha=0.5)),
    "jsd-head": ("head", "head", False, False, dict(divergence="jsd", beta=0.3, alpha=1.0, temperature=1.5)),
    "forward_kl-tail-bias": ("tail", "root", True, False, dict(alpha=0.8, label_smoothing=0.1)),
    "jsd-hidden-head": ("root", "hidden-head", False, False, dict(divergence="jsd", temperature=2.0)),
    "forward_kl-topk-bucket": ("head", "topk", False, False, dict(tail="bucket", alpha=0.7)),
    "jsd-topk": ("tail", "topk", False, False, dict(divergence="jsd", beta=0.7, alpha=1.0)),
    "jsd-replicated-teacher": ("root", "replicated", False, False, dict(divergence="jsd", temperature=3.0)),
    "forward_kl-ddp": ("ddp", "replicated", True, False, dict(temperature=2.0, alpha=0.5)),
    "rank-1-all-ignored": ("head", "root", False, True, dict(divergence="jsd", alpha=0.5)),
    # Under torch.autocast (bfloat16): the teacher's head gathered in bfloat16; against the same models
    # under autocast in one process, to bfloat16's tolerance.
    "forward_kl-tail-autocast": ("tail", "head", False, False, dict(temperature=2.0, alpha=0.5)),
}
AUTOCAST = {"forward_kl-tail-autocast"}


def _autocast(name: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if name in AUTOCAST else contextlib.nullcontext()


def _shard(model: TinyCausalLM, layout: str, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    if layout == "ddp":
        return DistributedDataParallel(model)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    if layout == "head":
        fully_shard(model.lm_head, mesh=mesh)
    elif layout == "tail":
        fully_shard([model.model.norm, model.lm_head], mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh)
    return model


def _numpy(tensor: torch.Tensor | None) -> np.ndarray | None:
    """A gradient as numpy (the local shard of a DTensor), which pickles by value."""
    if tensor is None:
        return None
    return (tensor.to_local() if hasattr(tensor, "to_local") else tensor).detach().double().numpy()


def _run_case(name: str, rank: int, mesh) -> dict:
    from torch.distributed.tensor import DTensor

    layout, teacher_mode, bias, all_ignored, kd = CASES[name]
    student, teacher = make_models(bias)  # the teacher is not frozen: no gradient may reach it anyway
    model = _shard(student, layout, mesh)
    if teacher_mode in ("root", "head", "hidden-head"):
        _shard(teacher, "head" if teacher_mode == "head" else "root", mesh)
    batch = make_batch(rank, all_ignored and rank == 1)
    captured = {}
    student.model.register_forward_hook(lambda m, args, out: captured.update(hidden=out) or out.retain_grad())
    loss_fn = fastkd.FusedLinearKDLoss(**kd)
    with _autocast(name):
        loss = _loss(model, teacher, teacher_mode, batch, rank, loss_fn)
    (2 * loss).backward()
    grads = {n: _numpy(p.grad) for n, p in student.named_parameters()}
    sharded = {n: isinstance(p, DTensor) for n, p in student.named_parameters()}
    return {
        "loss": loss.detach().double().numpy(),
        "hidden_grad": _numpy(captured["hidden"].grad),
        "grads": grads,
        "sharded": sharded,
        "teacher_grads": [n for n, p in teacher.named_parameters() if p.grad is not None],
        "teacher_head_sharded_after": isinstance(teacher.lm_head.weight, DTensor),
    }


def _loss(model, teacher, teacher_mode: str, batch: dict, rank: int, loss_fn) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if teacher_mode == "topk":
        loss = fsdp.causal_lm_kd_loss(model, batch, teacher_topk=make_topk(rank), loss_fn=loss_fn)
    elif teacher_mode == "hidden-head":
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():  # the user's own teacher pass; then only its shards are left
            teacher_hidden = fsdp.call_in_forward(teacher, lambda **kw: teacher.model(**kw), **inputs)
        fsdp.reshard(teacher)
        assert isinstance(teacher.lm_head.weight, DTensor)
        loss = fsdp.causal_lm_kd_loss(model, batch, teacher_hidden=teacher_hidden,
                                      teacher_head=teacher.lm_head, loss_fn=loss_fn)  # fmt: skip
    else:
        loss = fsdp.causal_lm_kd_loss(model, batch, teacher=teacher, loss_fn=loss_fn)
    return loss


def _errors(mesh) -> dict:
    """The messages of a sharded weight handed to the loss outside the forward."""
    student, _ = make_models()
    _shard(student, "root", mesh)
    weight = student.lm_head.weight  # before any forward: a DTensor shard
    h = torch.randn(4, H)
    out = {"is_dtensor": type(weight).__name__, "reason": sharding.sharded_reason(weight)}
    for key, call in {
        "check": lambda: sharding.check_not_sharded(student_weight=weight),
        "head_kd_loss": lambda: fsdp.head_kd_loss(student.lm_head, h, teacher_topk=make_topk(0), alpha=1.0),
        "fused_linear_kd_loss": lambda: fastkd.fused_linear_kd_loss(h, weight, h, weight.detach(), alpha=1.0),
    }.items():
        try:
            call()
            out[key] = ("no error", "")
        except Exception as error:  # noqa: BLE001 (the type is the result)
            out[key] = (type(error).__name__, str(error))
    return out


def _worker(rank: int, world: int, store: str, queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        results = {name: _run_case(name, rank, mesh) for name in CASES}
        queue.put((rank, results, _errors(mesh)))
    except BaseException:  # to the parent, which then stops the other rank (waiting in a collective)
        queue.put((rank, traceback.format_exc(), None))
        raise
    finally:
        time.sleep(0.1)  # torch 2.13 + gloo: see examples/ddp_fused_linear_kd.py
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every case's results on both ranks, from one spawn of two gloo processes."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not built")
    world = 2
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    store = tmp_path_factory.mktemp("gloo-fsdp") / "store"
    procs = [ctx.Process(target=_worker, args=(rank, world, str(store), queue)) for rank in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            rank, *rest = queue.get(timeout=180)
            if isinstance(rest[0], str):
                pytest.fail(f"rank {rank} failed:\n{rest[0]}")
            results[rank] = rest
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return results


def _reference_rank(name: str, rank: int) -> dict:
    """Rank ``rank``'s loss and gradients in one process, float64 (float32 models under autocast for the
    autocast case), on materialized logits: the loss is ``kd_loss`` of the shifted logits, dL/dparams of
    2 * loss."""
    layout, teacher_mode, bias, all_ignored, kd = CASES[name]
    student, teacher = (m if name in AUTOCAST else m.double() for m in make_models(bias))
    batch = make_batch(rank, all_ignored and rank == 1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with _autocast(name):
        hidden = student.model(**inputs)
        hidden.retain_grad()
        logits = student.lm_head(hidden)[:, :-1].double()
        with torch.no_grad():
            teacher_logits = teacher(**inputs)[:, :-1].double()
    options = dict(kd, backend="torch")
    if teacher_mode == "topk":
        indices, values = make_topk(rank, torch.float64)
        loss = fastkd.kd_loss(logits, None, batch["labels"][:, 1:],
                              teacher_topk=(indices[:, :-1], values[:, :-1]), **options)  # fmt: skip
    else:
        options.pop("tail", None)
        loss = fastkd.kd_loss(logits, teacher_logits, batch["labels"][:, 1:], **options)
    (2 * loss).backward()
    return {"loss": loss.detach(), "hidden_grad": hidden.grad,
            "grads": {n: p.grad for n, p in student.named_parameters()}}  # fmt: skip


def _check(actual: np.ndarray, expected: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    actual = torch.from_numpy(np.asarray(actual))
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert_close(actual, expected.double(), dtype)


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_equals_one_process(two_ranks, name):
    layout, dtype = CASES[name][0], torch.bfloat16 if name in AUTOCAST else torch.float32
    reference = [_reference_rank(name, rank) for rank in (0, 1)]
    got = [two_ranks[rank][0][name] for rank in (0, 1)]
    _check_ = functools.partial(_check, dtype=dtype)
    for rank in (0, 1):
        _check_(got[rank]["loss"], reference[rank]["loss"])
        _check_(got[rank]["hidden_grad"], reference[rank]["hidden_grad"])
    # FSDP2 and DDP average the parameters' gradients over the ranks.
    for param, grad_0 in reference[0]["grads"].items():
        expected = (grad_0 + reference[1]["grads"][param]) / 2
        if layout == "ddp":
            assert not got[0]["sharded"][param]
            for rank in (0, 1):
                _check_(got[rank]["grads"][param], expected)
        else:  # Shard(0): rank 0 holds the first ceil(n / 2) rows of the gradient, rank 1 the rest
            assert got[0]["sharded"][param] and got[1]["sharded"][param]
            _check_(np.concatenate([got[0]["grads"][param], got[1]["grads"][param]]), expected)
    for rank in (0, 1):
        assert got[rank]["teacher_grads"] == []


def test_uneven_shards_and_rows(two_ranks):
    """The head's 101 rows are sharded 51 + 50; the ranks hold 16 and 15 rows of the loss."""
    got = [two_ranks[rank][0]["forward_kl-root"] for rank in (0, 1)]
    assert got[0]["grads"]["lm_head.weight"].shape == (51, H)
    assert got[1]["grads"]["lm_head.weight"].shape == (50, H)
    assert got[0]["hidden_grad"].shape == (2, 9, H) and got[1]["hidden_grad"].shape == (3, 6, H)
    assert got[0]["loss"] != got[1]["loss"]


def test_rank_with_every_row_ignored(two_ranks):
    """Rank 1's loss is 0 and its hidden states get no gradient; the parameters still get rank 0's half."""
    got = two_ranks[1][0]["rank-1-all-ignored"]
    assert got["loss"] == 0 and (got["hidden_grad"] == 0).all()
    assert np.abs(got["grads"]["lm_head.weight"]).max() > 0


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c[1] in ("root", "head", "hidden-head")])
def test_teacher_left_sharded(two_ranks, name):
    """After a step the sharded teacher holds its shards only: its gathered head was freed."""
    for rank in (0, 1):
        assert two_ranks[rank][0][name]["teacher_head_sharded_after"]


def test_sharded_weight_outside_the_forward_names_it(two_ranks):
    for rank in (0, 1):
        errors = two_ranks[rank][1]
        assert errors["is_dtensor"] == "DTensor"
        assert "Shard(dim=0)" in errors["reason"]
        assert f"this rank holds ({51 - rank}, {H})" in errors["reason"]
        for key in ("check", "head_kd_loss"):
            kind, message = errors[key]
            assert kind == "ValueError", errors[key]
            assert message.startswith("student_weight is a DTensor (Shard(dim=0)) over a mesh of 2 rank(s)")
            assert "fastkd.fsdp.causal_lm_kd_loss(model, batch, teacher=...)" in message


def test_fused_linear_kd_loss_refuses_a_sharded_weight(two_ranks):
    """fused_linear_kd_loss itself raises the ValueError once it calls fastkd.sharding.check_not_sharded;
    before, it failed inside the matmul (never a wrong loss)."""
    kind, message = two_ranks[0][1]["fused_linear_kd_loss"]
    assert kind != "no error"
    if "fastkd.fsdp.causal_lm_kd_loss" not in message:
        assert kind == "RuntimeError" and "mixed torch.Tensor and DTensor" in message
        pytest.skip("fused_linear_kd_loss does not call fastkd.sharding.check_not_sharded yet")
    assert kind == "ValueError" and message.startswith("student_weight is a DTensor")


# One process, no process group.


def test_one_process_equals_materialized_logits():
    """Without sharding, causal_lm_kd_loss is kd_loss of the shifted logits (plain modules)."""
    kd = dict(divergence="jsd", beta=0.4, alpha=0.6, temperature=2.0)
    student, teacher = make_models(bias=True)
    batch = make_batch(0)
    loss = fsdp.causal_lm_kd_loss(student, batch, teacher=teacher, **kd)
    (2 * loss).backward()
    student64, teacher64 = (m.double() for m in make_models(bias=True))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    want = fastkd.kd_loss(student64(**inputs)[:, :-1], teacher64(**inputs)[:, :-1].detach(),
                          batch["labels"][:, 1:], backend="torch", **kd)  # fmt: skip
    (2 * want).backward()
    assert_close(loss.detach().double(), want.detach(), torch.float32)
    for (name, p), p64 in zip(student.named_parameters(), student64.parameters()):
        assert_close(p.grad.double(), p64.grad, torch.float32)
    assert all(p.grad is None for p in teacher.parameters())


def test_head_kd_loss_equals_fused_linear_kd_loss():
    student, teacher = make_models(bias=True)
    h, h_t, y = torch.randn(7, H), torch.randn(7, H_T), torch.tensor([1, 2, -100, 4, 5, 6, 100])
    got = fsdp.head_kd_loss(student.lm_head, h, teacher.lm_head, h_t, y, temperature=2.0, alpha=0.5)
    want = fastkd.fused_linear_kd_loss(h, student.lm_head.weight, h_t, teacher.lm_head.weight, y,
                                       student_bias=student.lm_head.bias, teacher_bias=teacher.lm_head.bias,
                                       temperature=2.0, alpha=0.5)  # fmt: skip
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    indices, values = make_topk(0)
    topk = (indices[0, :2], values[0, :2])
    got = fsdp.head_kd_loss(student.lm_head, h[:2], target=y[:2], teacher_topk=topk)
    want = fastkd.fused_linear_kd_loss(h[:2], student.lm_head.weight, target=y[:2],
                                       student_bias=student.lm_head.bias, teacher_topk=topk)  # fmt: skip
    torch.testing.assert_close(got, want, rtol=0, atol=0)


class _Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []
        self.register_forward_pre_hook(lambda m, args: (args[0] + 1,))  # as FSDP2 may cast the arguments
        self.register_forward_hook(lambda m, args, out: self.calls.append(("post", out)))

    def forward(self, x):
        self.calls.append(("forward", x))
        return x * 10


def test_call_in_forward_runs_the_hooks_around_fn():
    module = _Recorder()
    assert fsdp.call_in_forward(module, lambda x: module.calls.append(("fn", x)) or x * 2, 1) == 4
    assert module.calls == [("fn", 2), ("post", 4)]
    assert "forward" not in module.__dict__ and module(1) == 20  # the class's forward again


def test_call_in_forward_lets_fn_call_the_forward_and_restores_it_after_an_error():
    module = _Recorder()
    assert fsdp.call_in_forward(module, lambda x: module.forward(x) + 1, 1) == 21  # fn calls the forward
    own = types.MethodType(lambda self, x: -x, module)
    module.forward = own  # an instance-level forward (accelerate wraps forward so) is put back
    with pytest.raises(ZeroDivisionError):
        fsdp.call_in_forward(module, lambda x: 1 / 0, 1)
    assert module.__dict__["forward"] is own and module(1) == -2


def test_check_not_sharded_passes_whole_tensors():
    sharding.check_not_sharded(student_weight=torch.zeros(3, 2), student_bias=None, other=3)
    assert sharding.sharded_reason(torch.zeros(2)) is None and sharding.sharded_reason(None) is None


def test_check_not_sharded_names_a_deepspeed_placeholder():
    """DeepSpeed ZeRO-3 leaves an empty tensor with ds_* attributes outside the forward (no DeepSpeed here:
    the attributes are set by hand, as ZeRO-3 sets them)."""
    placeholder = torch.empty(0)
    placeholder.ds_id, placeholder.ds_shape = 7, torch.Size([V, H])
    placeholder.ds_status = types.SimpleNamespace(name="NOT_AVAILABLE")
    match = (r"^teacher_weight is a DeepSpeed ZeRO-3 parameter not gathered here \(ds_status NOT_AVAILABLE, "
             r"shape \(101, 16\), this rank holds \(0,\)\).*causal_lm_kd_loss")
    with pytest.raises(ValueError, match=match):
        sharding.check_not_sharded(student_weight=torch.zeros(2, 2), teacher_weight=placeholder)
    placeholder.ds_status = types.SimpleNamespace(name="AVAILABLE")  # gathered, inside the forward
    sharding.check_not_sharded(teacher_weight=placeholder)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(), ValueError, "pass one teacher: .* got none"),
        (dict(teacher=True, teacher_topk=True), ValueError, "got teacher, teacher_topk"),
        (dict(teacher_hidden=True), ValueError, "teacher_hidden and teacher_head go together"),
        (dict(teacher=True, loss_fn=True, alpha=1.0), TypeError, r"either loss_fn or the loss's keywords"),
        (dict(teacher=True, tau=2.0), TypeError, "unexpected keyword argument.*tau"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    student, teacher = make_models()
    values = {"teacher": teacher, "loss_fn": fastkd.FusedLinearKDLoss(), "teacher_topk": make_topk(0),
              "teacher_hidden": torch.zeros(2, 9, H_T)}  # fmt: skip
    kwargs = {k: values.get(k, v) for k, v in kwargs.items()}
    with pytest.raises(error, match=match):
        fsdp.causal_lm_kd_loss(student, make_batch(0), **kwargs)


def test_models_that_are_not_causal_lms_or_transform_their_logits_are_refused():
    with pytest.raises(TypeError, match="Linear is not a causal LM fastkd can split"):
        fsdp.causal_lm_parts(nn.Linear(2, 2))
    student, _ = make_models()
    student.config = types.SimpleNamespace(final_logit_softcapping=30.0)
    with pytest.raises(ValueError, match=r"transforms its logits after the head \(final_logit_softcapping"):
        fsdp.causal_lm_parts(student)
    student.config = types.SimpleNamespace(final_logit_softcapping=None, logit_scale=1.0)
    assert fsdp.causal_lm_parts(student) == (student.model, student.lm_head)


def test_hugging_face_causal_lm():
    """A tiny random Llama (no download): base_model and get_output_embeddings are its parts, and the loss
    equals kd_loss of its own logits."""
    transformers = pytest.importorskip("transformers")
    config = dict(vocab_size=V, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    student = transformers.LlamaForCausalLM(transformers.LlamaConfig(hidden_size=H, **config)).eval()
    teacher = transformers.LlamaForCausalLM(transformers.LlamaConfig(hidden_size=H_T, **config)).eval()
    assert fsdp.causal_lm_parts(student) == (student.model, student.lm_head)
    batch = make_batch(1)
    loss = fsdp.causal_lm_kd_loss(student, batch, teacher=teacher, divergence="jsd", alpha=0.5)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        want = fastkd.kd_loss(student(**inputs).logits[:, :-1], teacher(**inputs).logits[:, :-1],
                              batch["labels"][:, 1:], divergence="jsd", alpha=0.5)  # fmt: skip
    torch.testing.assert_close(loss.detach(), want, rtol=TOL[torch.float32], atol=TOL[torch.float32])


def test_under_autocast_the_heads_run_in_its_dtype():
    """Under torch.autocast (bfloat16 on the CPU) the loss is kd_loss of F.linear's autocast logits, to
    bfloat16's tolerance, whether the teacher's head is given whole or gathered in that dtype; the float32
    weight gets a float32 gradient, the teacher none."""
    student, teacher = make_models(bias=True)
    h, h_t, y = torch.randn(7, H), torch.randn(7, H_T), torch.tensor([1, 2, -100, 4, 5, 6, 100])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fsdp.head_kd_loss(student.lm_head, h.requires_grad_(), teacher.lm_head, h_t, y,
                                 temperature=2.0)  # fmt: skip
        logits, teacher_logits = student.lm_head(h), teacher.lm_head(h_t)
    assert logits.dtype == torch.bfloat16
    loss.backward()
    want = fastkd.kd_loss(logits.double(), teacher_logits.double(), y, temperature=2.0)
    assert_close(loss.double(), want.detach(), torch.bfloat16)
    assert student.lm_head.weight.grad.dtype == torch.float32 and h.grad.dtype == torch.float32
    assert teacher.lm_head.weight.grad is None
