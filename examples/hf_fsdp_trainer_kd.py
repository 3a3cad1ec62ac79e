"""Distill a causal language model with the Hugging Face ``Trainer``, FSDP2 through accelerate, and
fused-linear KD computed inside the student's forward (``fastkd.fsdp.causal_lm_kd_loss``).

    pip install transformers accelerate
    torchrun --nproc_per_node 2 examples/hf_fsdp_trainer_kd.py --fsdp     # FSDP2: gloo on CPU, NCCL on GPUs
    torchrun --nproc_per_node 2 examples/hf_fsdp_trainer_kd.py            # DDP
    python examples/hf_fsdp_trainer_kd.py                                 # 1 process

``KDTrainer.compute_loss`` is one call: ``causal_lm_kd_loss(model, inputs, teacher=self.teacher)`` runs the
frozen teacher (its last hidden states, under no_grad; then its gathered parameters are freed), then the
student's decoder and the loss as the student's forward, where FSDP2 has gathered the student's
``lm_head`` and will reduce-scatter its gradient; the teacher's ``lm_head`` is all-gathered for the loss
and freed after. With ``--fsdp`` the Trainer shards the student as accelerate does (each decoder layer a
unit, the embedding one, the final norm and ``lm_head`` one, the model the root) and ``KDTrainer`` shards
the teacher the same way (``fsdp2_prepare_model``). At the first step the loss is checked against
``kd_loss`` on the logits of the models' own forwards. The models are tiny Llamas built from configs
(random weights, no download); the data follow a noisy bigram rule (each token's successor is a fixed
permutation of it, 80% of the time), right-padded with label -100. The teacher learns the rule first.

On CPU, accelerate 1.15 does not turn FSDP on (its state enables FSDP for GPU-like devices only, and it
refuses a model of DTensors under DDP), though FSDP2 runs on CPU with gloo: ``KDTrainer`` switches the
accelerator's state to FSDP for ``--fsdp`` on CPU (``create_accelerator_and_postprocess``). On GPUs the
Trainer's own FSDP2 path runs, unchanged.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch
from torch.utils.data import Dataset

import fastkd
from fastkd import fsdp

try:
    import transformers  # first: without it, fail before the heavier imports
    import accelerate  # noqa: F401  (the Trainer needs it)
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from transformers import LlamaConfig, LlamaForCausalLM, PrinterCallback, Trainer, TrainingArguments
except ImportError as error:
    sys.exit(f"examples/hf_fsdp_trainer_kd.py needs Hugging Face transformers and accelerate ({error}): "
             "pip install transformers accelerate")  # fmt: skip


class KDTrainer(Trainer):
    """A ``Trainer`` whose loss is fastkd's fused-linear distillation from ``teacher`` (frozen), computed
    inside the student's forward; ``kd_kwargs`` are ``fastkd.FusedLinearKDLoss``'s."""

    def __init__(self, *args, teacher: torch.nn.Module, kd_kwargs: dict, **kwargs):
        super().__init__(*args, **kwargs)
        teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        fsdp2 = self.is_fsdp_enabled and self.accelerator.state.fsdp_plugin.fsdp_version == 2
        # Shard the teacher as accelerate shards the student (the Trainer prepares only the model it trains).
        self.teacher = fsdp2_prepare_model(self.accelerator, teacher) if fsdp2 else teacher
        self.kd_kwargs = kd_kwargs
        self.kd_loss = fastkd.FusedLinearKDLoss(**kd_kwargs)
        # compute_loss returns this batch's mean over its tokens, so the Trainer divides it by the gradient
        # accumulation steps itself (and passes no num_items_in_batch).
        self.model_accepts_loss_kwargs = False
        self.checked = None

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if self.args.fsdp_plugin_args and state.distributed_type == DistributedType.MULTI_CPU:
            # CPU only: accelerate would run DDP here; FSDP2 runs on CPU with gloo, so the state says FSDP.
            state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weight = type(fsdp.causal_lm_parts(model)[1].weight).__name__  # before the first forward: a DTensor
        # One call: the teacher, then the student's decoder and the loss as the student's forward.
        loss = fsdp.causal_lm_kd_loss(model, inputs, teacher=self.teacher, loss_fn=self.kd_loss)
        if self.checked is None:  # once: the same loss as kd_loss on the logits of the models' own forwards
            self.checked = self.check(model, inputs, loss.detach(), weight)
        return (loss, None) if return_outputs else loss

    @torch.no_grad()
    def check(self, model, inputs: dict, loss: torch.Tensor, weight: str) -> float:
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        student_logits = model(**model_inputs).logits[:, :-1]  # (B, S - 1, V): small here
        teacher_logits = self.teacher(**model_inputs).logits[:, :-1]
        fsdp.reshard(self.teacher)
        want = fastkd.kd_loss(student_logits, teacher_logits, inputs["labels"][:, 1:], **self.kd_kwargs)
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
        print(f"rank {self.args.process_index}: step 0: fused loss {loss.item():.6f} = kd_loss on the logits "
              f"{want.item():.6f}; {type(model).__name__}, its lm_head.weight a {weight} before the first "
              "forward", flush=True)  # fmt: skip
        return loss.item()


class BigramData(Dataset):
    """Sequences of a noisy bigram rule, right-padded to ``seq`` tokens (attention 0, label -100)."""

    def __init__(self, n: int, seq: int, vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(vocab, generator=g)
        tokens = [torch.randint(vocab, (n,), generator=g)]
        for _ in range(seq - 1):
            keep = torch.rand(n, generator=g) < 0.8
            tokens.append(torch.where(keep, perm[tokens[-1]], torch.randint(vocab, (n,), generator=g)))
        self.input_ids = torch.stack(tokens, 1)
        lengths = torch.randint(seq // 2, seq + 1, (n, 1), generator=g)
        self.attention_mask = (torch.arange(seq) < lengths).long()
        self.input_ids[self.attention_mask == 0] = 0  # the pad token
        self.labels = self.input_ids.masked_fill(self.attention_mask == 0, -100)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i],
                "labels": self.labels[i]}  # fmt: skip


def tiny_llama(vocab: int, hidden: int, layers: int, seq: int) -> LlamaForCausalLM:
    """A randomly initialised Llama: ``layers`` decoder layers of width ``hidden``, an untied lm_head."""
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=seq, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False)  # fmt: skip
    return LlamaForCausalLM(config)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fsdp", action="store_true", help="shard student and teacher with FSDP2 (torchrun)")
    p.add_argument("--steps", type=int, default=40, help="student optimizer steps")
    p.add_argument("--teacher-steps", type=int, default=60, help="teacher pre-training steps")
    p.add_argument("--vocab", type=int, default=257, help="odd: the heads split unevenly over 2 ranks")
    p.add_argument("--batch", type=int, default=16, help="sequences per process and step")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--hidden", type=int, default=32, help="student width")
    p.add_argument("--teacher-hidden", type=int, default=64)
    p.add_argument("--divergence", choices=("forward_kl", "reverse_kl", "jsd"), default="forward_kl")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the KD term; 1 - alpha for CE")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--device", choices=("cpu", "auto"), default="cpu", help="auto: CUDA when present")
    args = p.parse_args()
    transformers.set_seed(0)
    data = BigramData(1024, args.seq, args.vocab)

    # Teacher: trained with the model's own cross-entropy; every process trains the same one (seed, data).
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu"
    teacher = tiny_llama(args.vocab, args.teacher_hidden, 2, args.seq).to(device)
    opt, loss = torch.optim.AdamW(teacher.parameters(), lr=1e-2), torch.tensor(float("nan"))
    for _ in range(args.teacher_steps):
        batch = data[torch.randint(len(data), (32,))]
        loss = teacher(**{k: v.to(device) for k, v in batch.items()}).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher_loss = loss.item()

    student = tiny_llama(args.vocab, args.hidden, 1, args.seq)
    fsdp_args = {}
    if args.fsdp:  # accelerate's FSDP2: each LlamaDecoderLayer a unit (and the rest as accelerate groups it)
        config = {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
        fsdp_args = {"fsdp": True, "fsdp_config": config}
    kd_kwargs = dict(temperature=args.temperature, alpha=args.alpha, divergence=args.divergence)
    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch,
            learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
            report_to=[], disable_tqdm=True, use_cpu=device == "cpu", dataloader_pin_memory=False, seed=0,
            **fsdp_args,
        )  # fmt: skip
        trainer = KDTrainer(model=student, args=training_args, train_dataset=data, teacher=teacher,
                            kd_kwargs=kd_kwargs)  # fmt: skip
        trainer.remove_callback(PrinterCallback)  # the losses are printed below
        trainer.train()
    mode = f"FSDP{trainer.accelerator.state.fsdp_plugin.fsdp_version}" if trainer.is_fsdp_enabled else "DDP"
    mode = mode if trainer.args.world_size > 1 or trainer.is_fsdp_enabled else "one process"
    if trainer.is_world_process_zero():
        print(f"teacher: CE {teacher_loss:.4f} after {args.teacher_steps} steps")
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        for step in range(0, len(losses), 10):
            print(f"step {step + 1}: loss {losses[step]:.4f}")
        print(f"transformers {transformers.__version__}, accelerate {accelerate.__version__}: {len(losses)} "
              f"steps, {trainer.args.world_size} process(es), {mode}")  # fmt: skip
        print(f"loss first={losses[0]:.6f} last={losses[-1]:.6f}")
    if torch.distributed.is_initialized():  # torchrun: the Trainer's process group, closed before exit
        if torch.distributed.get_backend() == "gloo":
            time.sleep(0.1)  # torch 2.13 + gloo: see examples/ddp_fused_linear_kd.py
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
