"""Distill with TRL's trainers, the loss computed by fastkd's fused-linear KD inside the student's forward:
``GKDTrainer`` (``trl.experimental.gkd``) and ``DistillationTrainer`` (``trl``), with FSDP2 or without.

    pip install trl
    torchrun --nproc_per_node 2 examples/trl_distill_fused.py --trainer gkd --fsdp      # FSDP2, 2 processes
    torchrun --nproc_per_node 2 examples/trl_distill_fused.py --trainer distillation --fsdp
    python examples/trl_distill_fused.py --trainer gkd                                  # 1 process

Each trainer keeps its own data, generation and bookkeeping; one method is overridden, the one that
computes the loss, and computes the same loss without the (batch, seq, vocab) logits:

- ``GKDTrainer.compute_loss`` forms both models' logits and takes TRL's generalized JSD (beta: 0 forward
  KL, 1 reverse KL; temperature 1) over the completion tokens (labels shifted by one), divided by
  ``num_items_in_batch`` (else by the local count). ``FusedGKDTrainer.compute_loss`` is
  ``fastkd.fsdp.causal_lm_kd_loss(model, batch, teacher=teacher)`` with the same divergence, summed and
  divided the same way.
- ``DistillationTrainer.compute_loss`` already runs ``_compute_loss`` as the student's forward (its forward
  redirection): it takes the student's and teacher's last hidden states at the completion tokens and
  projects them through both heads by chunks. ``FusedDistillationTrainer._compute_loss`` takes the same
  hidden states and calls ``fastkd.fsdp.head_kd_loss`` (the head's forward, the teacher's head gathered),
  at the trainer's temperature (no T^2), with its normalization. It does not compute the student's
  entropy, which TRL logs (logged as None here).

At the first step each checks its loss against the trainer's own (``super()``). With ``--fsdp`` both
models are sharded as accelerate shards the student (the TRL trainers prepare the teacher replicated;
here it is sharded with ``fsdp2_prepare_model``). On CPU accelerate 1.15 does not turn FSDP on, though
FSDP2 runs with gloo: the trainers switch the accelerator's state to FSDP there (see
examples/hf_fsdp_trainer_kd.py). The models are tiny Llamas built from configs and the tokenizer a word
level one built here (nothing downloaded); prompts follow a noisy bigram rule the teacher learns first.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import torch

import fastkd
from fastkd import fsdp

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GKDTrainer lives in trl.experimental
try:
    import trl  # first: without it, fail before the heavier imports
    import datasets
    import transformers
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, PrinterCallback
    from trl import DistillationConfig, DistillationTrainer
    from trl.experimental.gkd import GKDConfig, GKDTrainer
except ImportError as error:
    sys.exit(f"examples/trl_distill_fused.py needs TRL (with transformers, accelerate, datasets) ({error}): "
             "pip install trl")  # fmt: skip


def fused_kd_kwargs(beta: float, temperature: float) -> dict:
    """TRL's generalized JSD as fastkd's keywords, summed over the tokens: beta 0 is KL(teacher || student),
    1 KL(student || teacher), else beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s
    (fastkd's JSD); both distributions at ``temperature``, no T^2; pure distillation."""
    divergence = "forward_kl" if beta == 0 else "reverse_kl" if beta == 1 else "jsd"
    return dict(divergence=divergence, beta=beta if divergence == "jsd" else 0.5, alpha=1.0,
                temperature=temperature, temperature_squared=False, reduction="sum")  # fmt: skip


class ShardedTeacher:
    """Mixin: FSDP2 on CPU (accelerate turns it on for GPU-like devices only), and the teacher sharded as the
    student when FSDP2 is on."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if self.args.fsdp_plugin_args and state.distributed_type == DistributedType.MULTI_CPU:
            state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True

    def shard_teacher(self) -> None:
        if self.is_fsdp_enabled and self.accelerator.state.fsdp_plugin.fsdp_version == 2:
            teacher = self.teacher_model.requires_grad_(False)
            self.teacher_model = fsdp2_prepare_model(self.accelerator, teacher)

    def report(self, fused: torch.Tensor, trl_loss: torch.Tensor) -> None:
        torch.testing.assert_close(fused, trl_loss, rtol=1e-4, atol=1e-7)
        trainer = type(self).__mro__[2].__name__  # the TRL trainer
        print(f"rank {self.args.process_index}: step 0: fused loss {fused.item():.8f} = {trainer}'s "
              f"{trl_loss.item():.8f}", flush=True)  # fmt: skip


class FusedGKDTrainer(ShardedTeacher, GKDTrainer):
    """``GKDTrainer`` whose ``compute_loss`` is fused (module doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.shard_teacher()
        self.fused = fastkd.FusedLinearKDLoss(**fused_kd_kwargs(self.beta, 1.0))
        self.checked = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = {key: inputs[key] for key in ("input_ids", "attention_mask", "labels")}
        self.teacher_model.eval()
        with self.accelerator.autocast():  # what accelerate's wrapper of model.forward would enter
            loss = fsdp.causal_lm_kd_loss(model, batch, teacher=self.teacher_model, loss_fn=self.fused)
        count = (batch["labels"][:, 1:] != -100).sum().clamp(min=1)
        loss = loss / (count if num_items_in_batch is None else num_items_in_batch.to(loss.device))
        if not self.checked:  # TRL's loss on the materialized logits
            self.checked = True
            with torch.no_grad():
                trl_loss = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
                self.report(loss.detach(), trl_loss)
            fsdp.reshard(self.teacher_model)
        return (loss, None) if return_outputs else loss


class FusedDistillationTrainer(ShardedTeacher, DistillationTrainer):
    """``DistillationTrainer`` whose ``_compute_loss`` is fused (module doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.shard_teacher()
        self.fused = fastkd.FusedLinearKDLoss(**fused_kd_kwargs(self.beta, self.temperature))
        self.checked = False

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        # Runs as the student's forward (DistillationTrainer.compute_loss redirects it so).
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mask = inputs["completion_mask"] * inputs.get("tool_mask", 1)
        completion = inputs["completion_ids"].size(1)
        hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, completion)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(
                self.teacher_model, teacher, self._get_last_hidden_state, teacher, input_ids, attention_mask,
                completion,
            )  # fmt: skip
        fsdp.reshard(self.teacher_model)
        target = inputs["completion_ids"].masked_fill(mask == 0, -100)  # (B, K): the tokens the rows predict
        head, teacher_head = unwrapped_student.get_output_embeddings(), teacher.get_output_embeddings()
        loss = fsdp.head_kd_loss(head, hidden, teacher_head, teacher_hidden, target, loss_fn=self.fused)
        count = mask.sum()
        total = count.clamp(min=1) if num_items_in_batch is None else num_items_in_batch.to(loss.device)
        loss = loss / total
        if not self.checked:  # TRL's chunked loss on the same inputs
            self.checked = True
            with torch.no_grad():
                trl_loss = super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)[0]
                self.report(loss.detach(), trl_loss)
            fsdp.reshard(self.teacher_model)
        return loss, torch.tensor(float("nan"), device=loss.device), count  # the entropy is not computed


def word_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """Token i is the word "t{i}"; pad t0, bos t1, eos t2, unk t3; left padding (for generation)."""
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t3"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="t0", bos_token="t1", eos_token="t2",
                                   unk_token="t3", padding_side="left")  # fmt: skip


def bigram_sequences(n: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """(n, length) tokens in [4, vocab): next = perm[token] with probability 0.8, else uniform."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(vocab - 4, generator=g) + 4
    seqs = [torch.randint(4, vocab, (n,), generator=g)]
    for _ in range(length - 1):
        keep = torch.rand(n, generator=g) < 0.8
        seqs.append(torch.where(keep, perm[seqs[-1] - 4], torch.randint(4, vocab, (n,), generator=g)))
    return torch.stack(seqs, 1)


def gkd_collator(prompt: int):
    """Rows of token lists -> GKD's batch: the sequence, its labels (-100 on the prompt) and the prompt alone
    (for on-policy generation)."""

    def collate(rows: list[dict]) -> dict:
        ids = torch.tensor([row["ids"] for row in rows])
        labels = ids.clone()
        labels[:, :prompt] = -100
        ones = torch.ones_like(ids)
        return {"input_ids": ids, "attention_mask": ones, "labels": labels, "prompts": ids[:, :prompt],
                "prompt_attention_mask": ones[:, :prompt]}  # fmt: skip

    return collate


def tiny_llama(vocab: int, hidden: int, layers: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False)  # fmt: skip
    return LlamaForCausalLM(config)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trainer", choices=("gkd", "distillation"), default="gkd")
    p.add_argument("--fsdp", action="store_true", help="shard student and teacher with FSDP2 (torchrun)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--teacher-steps", type=int, default=60)
    p.add_argument("--vocab", type=int, default=101, help="odd: the heads split unevenly over 2 ranks")
    p.add_argument("--batch", type=int, default=8, help="sequences per process and step")
    p.add_argument("--prompt", type=int, default=6, help="prompt tokens")
    p.add_argument("--completion", type=int, default=10, help="completion tokens (data and generation)")
    p.add_argument("--lmbda", type=float, default=0.5, help="GKD: share of steps on the student's samples")
    p.add_argument("--beta", type=float, default=0.5, help="0 forward KL, 1 reverse KL, else generalized JSD")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--bf16", action="store_true", help="mixed precision (autocast)")
    args = p.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5's renamings, inside TRL
    transformers.set_seed(0)
    vocab, length = args.vocab, args.prompt + args.completion
    seqs = bigram_sequences(2048, length, vocab)

    # Teacher: trained with the model's own cross-entropy; every process trains the same one.
    teacher = tiny_llama(vocab, 64, 2)
    opt, loss = torch.optim.AdamW(teacher.parameters(), lr=1e-2), torch.tensor(float("nan"))
    for _ in range(args.teacher_steps):
        ids = seqs[torch.randint(len(seqs), (32,))]
        loss = teacher(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher_loss = loss.item()

    student = tiny_llama(vocab, 32, 1)
    tokenizer = word_tokenizer(vocab)
    common = dict(max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=args.lr,
                  lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
                  disable_tqdm=True, use_cpu=not torch.cuda.is_available(), bf16=args.bf16, seed=0,
                  beta=args.beta)  # fmt: skip
    if args.fsdp:
        config = {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
        common.update(fsdp=True, fsdp_config=config)
    with tempfile.TemporaryDirectory() as out:
        if args.trainer == "gkd":
            config = GKDConfig(output_dir=out, lmbda=args.lmbda, max_new_tokens=args.completion,
                               temperature=1.0, max_length=length, **common)  # fmt: skip
            data = datasets.Dataset.from_dict({"ids": seqs[:512].tolist()})
            trainer = FusedGKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=data,
                                      processing_class=tokenizer,
                                      data_collator=gkd_collator(args.prompt))  # fmt: skip
        else:
            config = DistillationConfig(output_dir=out, max_completion_length=args.completion,
                                        temperature=1.0, **common)  # fmt: skip
            prompts = [" ".join(f"t{i}" for i in row) for row in seqs[:512, : args.prompt].tolist()]
            trainer = FusedDistillationTrainer(model=student, teacher_model=teacher, args=config,
                                               train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
                                               processing_class=tokenizer)  # fmt: skip
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    if trainer.is_world_process_zero():
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        mode = "FSDP2" if trainer.is_fsdp_enabled else f"{trainer.args.world_size} process(es)"
        print(f"teacher: CE {teacher_loss:.4f}; TRL {trl.__version__}, {type(trainer).__name__}, {mode}: "
              f"{len(losses)} steps")  # fmt: skip
        for step in range(0, len(losses), 10):
            print(f"step {step + 1}: loss {losses[step]:.6f}")
        print(f"loss first={losses[0]:.6f} last={losses[-1]:.6f}")
    if torch.distributed.is_initialized():  # torchrun: the Trainer's process group, closed before exit
        if torch.distributed.get_backend() == "gloo":
            time.sleep(0.1)  # torch 2.13 + gloo: see examples/ddp_fused_linear_kd.py
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
