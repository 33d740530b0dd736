"""Supervised fine-tuning recipe: next-token loss on the response tokens of demonstrations only.

The prompt (rendered with the chat template when the tokenizer has one) gets label -100, so
the model learns to answer, not to write questions.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rlhfkit.training import TrainConfig


@dataclass(frozen=True)
class SFTConfig(TrainConfig):
    """Supervised fine-tuning stage."""

    model: str = ""
    """model to fine-tune (directory or hub name); empty means the pretrain stage's output"""
    data: str = ""
    """demonstrations with ``prompt`` and ``response`` fields; empty means the task's sft.jsonl"""
    max_len: int = 192
    """longest prompt + response in tokens; longer examples are reported as errors"""
    epochs: float = 2.0
    """passes over the demonstrations"""
    trust_remote_code: bool = False
    """allow a hub model's own Python code to run when loading it (off unless you trust the source)"""


def run(cfg: SFTConfig, model_path: str, data_path: Path, out_dir: Path, accelerator, log) -> dict:
    from rlhfkit.data.collate import collate_sft, tokenize_demonstrations
    from rlhfkit.data.loading import load_demonstrations
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer, model_config, save_pretrained_atomic
    from rlhfkit.training import train_lm

    demos = load_demonstrations(data_path)
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code)
    context = getattr(model_config(model_path), "max_position_embeddings", cfg.max_len)
    max_len = min(cfg.max_len, context)
    # Validate every record before loading the model: a bad record fails in seconds, not after training.
    examples = tokenize_demonstrations(tokenizer, demos, max_len)
    model = load_causal_lm(model_path, trust_remote_code=cfg.trust_remote_code)
    metrics = train_lm(
        model,
        n_examples=len(examples),
        collate=lambda idx: collate_sft([examples[i] for i in idx], tokenizer.pad_token_id),
        loss_tokens=[e.n_loss_tokens for e in examples],
        cfg=cfg,
        accelerator=accelerator,
        log=log,
        progress_desc="sft",
    )
    if accelerator.is_main_process:
        save_pretrained_atomic(accelerator.unwrap_model(model), tokenizer, out_dir / "model")
    metrics.update(n_demonstrations=len(demos))
    return metrics
