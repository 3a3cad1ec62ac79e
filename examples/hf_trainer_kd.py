"""Distill a causal language model with the Hugging Face ``Trainer`` and ``fastkd.FusedLinearKDLoss``.

    pip install transformers accelerate
    python examples/hf_trainer_kd.py

``KDTrainer`` overrides ``compute_loss``: it runs the student and the frozen teacher for their last
hidden states (``logits_to_keep=1`` keeps the models from forming the (batch, seq, vocab) logits) and
hands them, with each ``lm_head``'s weight, to the fused loss, which computes KD + CE over the shifted
labels by chunks of rows. The models are tiny Llamas built from configs (random weights, no
download); the data follow a noisy bigram rule (each token's successor is a fixed permutation of it,
80% of the time), with right padding labelled -100. The teacher learns the rule first, with the
model's own cross-entropy; then the Trainer distills it into a student of half the width.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch
from torch.utils.data import Dataset

import fastkd

try:
    import accelerate  # noqa: F401  (the Trainer needs it)
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM, PrinterCallback, Trainer, TrainingArguments
except ImportError as error:
    sys.exit(f"examples/hf_trainer_kd.py needs Hugging Face transformers and accelerate ({error}): "
             "pip install transformers accelerate")  # fmt: skip


class KDTrainer(Trainer):
    """A ``Trainer`` whose loss is fastkd's distillation from ``teacher`` (frozen) through both lm_heads."""

    def __init__(self, *args, teacher: torch.nn.Module, kd_loss: fastkd.FusedLinearKDLoss, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.kd_loss = kd_loss
        # compute_loss returns this batch's mean over its tokens, so the Trainer should divide it by the
        # gradient accumulation steps itself (and not pass num_items_in_batch).
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        # Through the (possibly wrapped) model, so DDP/accelerate see the forward. hidden_states[-1] is
        # the final norm's output, lm_head's input; only the last position's logits are formed.
        outputs = model(**inputs, output_hidden_states=True, logits_to_keep=1)
        with torch.no_grad():
            teacher_outputs = self.teacher(**inputs, output_hidden_states=True, logits_to_keep=1)
        hidden, teacher_hidden = outputs.hidden_states[-1], teacher_outputs.hidden_states[-1]
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        teacher_head = self.teacher.get_output_embeddings()
        if self.state.global_step == 0:  # once: the hidden states really are what lm_head maps to logits
            with torch.no_grad():
                torch.testing.assert_close(head(hidden[:, -1:]), outputs.logits)
        # Causal LM: position i predicts token i + 1; rows labelled -100 (padding) count in neither term.
        loss = self.kd_loss(
            hidden[:, :-1], head.weight, teacher_hidden[:, :-1], teacher_head.weight, labels[:, 1:],
            student_bias=head.bias, teacher_bias=teacher_head.bias,
        )  # fmt: skip
        return (loss, outputs) if return_outputs else loss


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
    """A randomly initialised Llama: ``layers`` decoder layers of width ``hidden``, 4 heads, an untied
    lm_head (V, hidden) without bias."""
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=seq, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False)  # fmt: skip
    return LlamaForCausalLM(config)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40, help="student optimizer steps")
    p.add_argument("--teacher-steps", type=int, default=60, help="teacher pre-training steps")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--hidden", type=int, default=32, help="student width")
    p.add_argument("--teacher-hidden", type=int, default=64)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the KD term; 1 - alpha for CE")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--device", choices=("cpu", "auto"), default="cpu", help="auto: CUDA when present")
    args = p.parse_args()
    transformers.set_seed(0)
    data = BigramData(1024, args.seq, args.vocab)

    # Teacher: 2 layers, trained with the model's own cross-entropy (labels=...), then frozen by KDTrainer.
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu"
    teacher = tiny_llama(args.vocab, args.teacher_hidden, 2, args.seq).to(device)
    opt, loss = torch.optim.AdamW(teacher.parameters(), lr=1e-2), torch.tensor(float("nan"))
    for _ in range(args.teacher_steps):
        batch = data[torch.randint(len(data), (32,))]
        loss = teacher(**{k: v.to(device) for k, v in batch.items()}).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher_loss = loss.item()  # every process trains the same teacher (same seed and data)

    student = tiny_llama(args.vocab, args.hidden, 1, args.seq)
    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch,
            learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
            report_to=[], disable_tqdm=True, use_cpu=args.device == "cpu", dataloader_pin_memory=False,
            seed=0,
        )  # fmt: skip
        kd_loss = fastkd.FusedLinearKDLoss(temperature=args.temperature, alpha=args.alpha, ignore_index=-100)
        trainer = KDTrainer(model=student, args=training_args, train_dataset=data, teacher=teacher,
                            kd_loss=kd_loss)  # fmt: skip
        trainer.remove_callback(PrinterCallback)  # the losses are printed below
        trainer.train()
    if trainer.is_world_process_zero():
        print(f"teacher: CE {teacher_loss:.4f} after {args.teacher_steps} steps")
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        for step in range(0, len(losses), 10):
            print(f"step {step + 1}: loss {losses[step]:.4f}")
        print(f"transformers {transformers.__version__}: {len(losses)} steps")
        print(f"loss first={losses[0]:.6f} last={losses[-1]:.6f}")


if __name__ == "__main__":
    main()
