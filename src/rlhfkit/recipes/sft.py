"""Supervised fine-tuning recipe: next-token loss on the response tokens of demonstrations only.

The prompt (rendered with the chat template when the tokenizer has one) gets label -100, so
the model learns to answer, not to write questions. A batch goes through the model as one unpadded
row (``padding_free``), each example attending only to itself, and the output head runs only where
a response token is predicted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfkit.checkpoints import LoopCheckpoint, checkpoint_dir
from rlhfkit.data.collate import Truncation, collate_sft, collate_sft_unpadded, tokenize_demonstrations
from rlhfkit.data.loading import load_demonstrations
from rlhfkit.distributed import engine_checkpoints_activations, gathered_state_dict
from rlhfkit.models.loading import load_causal_lm, load_tokenizer, model_config
from rlhfkit.models.trainable import make_trainable, save_trained
from rlhfkit.models.view_attention import supports_view_attention
from rlhfkit.paths import ConfigPath, ModelRef
from rlhfkit.stage import StageContext
from rlhfkit.training import TrainConfig, train_lm


@dataclass(frozen=True)
class SFTConfig(TrainConfig):
    """Supervised fine-tuning stage."""

    model: ModelRef = "stage:pretrain/model"
    """model to fine-tune: a directory, a hub name, a .gguf file, package:NAME[/FILE] or a stage's output"""
    data: ConfigPath = "stage:data/sft.jsonl"
    """demonstrations: ``prompt`` + ``response``/``completion``, or ``messages`` (default: the task's)"""
    max_len: int = 192
    """longest prompt + response in tokens (see ``truncation``)"""
    truncation: Truncation = Truncation.error
    """a longer example: error (names file:line), left (cut the prompt's start) or right (cut the response's end);
    metrics.json counts the truncated ones"""
    epochs: float = 2.0
    """passes over the demonstrations"""
    trust_remote_code: bool = False
    """allow a hub model's own Python code to run when loading it (off unless you trust the source)"""
    padding_free: bool = True
    """each batch as one unpadded row, every example attending only to itself (view attention,
    ``data.collate.collate_sft_unpadded``): no compute on padding, the same loss as padded rows (tested).
    A model whose attention is not pluggable, or activation checkpointing, takes padded rows"""


def run(cfg: SFTConfig, ctx: StageContext) -> dict:
    model_path, data_path = ctx.model(cfg.model, "model"), ctx.resolve(cfg.data, key="data")
    out_dir, accelerator, log = ctx.stage_dir, ctx.accelerator, ctx.log
    demos = load_demonstrations(data_path)
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code)
    context = getattr(model_config(model_path), "max_position_embeddings", cfg.max_len)
    max_len = min(cfg.max_len, context)
    # Validate every record before loading the model: a bad record fails in seconds, not after training.
    examples, n_truncated = tokenize_demonstrations(tokenizer, demos, max_len, cfg.truncation)
    if n_truncated:
        print(f"[rlhfkit] sft: {n_truncated} of {len(demos)} demonstrations truncated to {max_len} tokens ({cfg.truncation.value})")
    model = load_causal_lm(model_path, trust_remote_code=cfg.trust_remote_code)
    torch.manual_seed(cfg.seed)  # the adapters' initialisation under LoRA, as dpo.run seeds it: a rerun (a resume) starts alike
    model = make_trainable(model, cfg.lora, cfg.gradient_checkpointing)
    # FSDP's activation checkpointing wraps the layers only in ``prepare``: asked here, before it.
    unpadded = cfg.padding_free and supports_view_attention(model) and not engine_checkpoints_activations(accelerator)
    if cfg.padding_free and not unpadded:
        print(f"[rlhfkit] sft: {type(model).__name__}: attention not pluggable or activation checkpointing on "
              "(see supports_view_attention; FSDP's activation_checkpointing); padded batches")

    def collate(idx: list[int]) -> dict[str, torch.Tensor]:
        batch = [examples[i] for i in idx]
        return collate_sft_unpadded(batch) if unpadded else collate_sft(batch, tokenizer.pad_token_id)

    metrics = train_lm(
        model,
        n_examples=len(examples),
        collate=collate,
        loss_tokens=[e.n_loss_tokens for e in examples],
        cfg=cfg,
        accelerator=accelerator,
        log=log,
        progress_desc="sft",
        checkpoint=LoopCheckpoint(checkpoint_dir(out_dir), cfg, accelerator, log, "sft"),
    )
    state_dict = gathered_state_dict(accelerator, model)  # FSDP / ZeRO-3: every process takes part in the gather
    if accelerator.is_main_process:
        save_trained(accelerator.unwrap_model(model), tokenizer, out_dir, cfg.lora, state_dict=state_dict)
    metrics.update(n_demonstrations=len(demos), n_truncated=n_truncated, padding_free=unpadded)
    return metrics
