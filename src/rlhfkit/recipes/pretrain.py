"""Pretraining recipe: a causal LM on a text corpus, with sequence packing.

From scratch (a byte-level BPE tokenizer trained on the corpus, then a tiny Llama/Qwen2 model
from a ``transformers`` config) or, with ``init`` set, continued pretraining of any checkpoint
(transfer learning).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from rlhfkit.checkpoints import LoopCheckpoint, checkpoint_dir
from rlhfkit.data.collate import collate_packed, pack_documents
from rlhfkit.data.loading import load_texts
from rlhfkit.distributed import gathered_state_dict
from rlhfkit.models.loading import (
    TinyModelConfig, build_tiny_causal_lm, load_causal_lm, load_tokenizer, save_pretrained_atomic,
)
from rlhfkit.models.tokenizer import train_bpe_tokenizer
from rlhfkit.paths import ConfigPath, ModelRef
from rlhfkit.stage import StageContext
from rlhfkit.training import TrainConfig, train_lm


@dataclass(frozen=True)
class PretrainConfig(TrainConfig):
    """Pretraining stage."""

    data: ConfigPath = "stage:data/pretrain.jsonl"
    """corpus: .txt (blank-line separated documents) or records with a ``text`` field (default: the task's)"""
    init: ModelRef = ""
    """empty: train from scratch; else a model directory or hub name to continue pretraining"""
    arch: TinyModelConfig = field(default_factory=TinyModelConfig)
    """architecture of a from-scratch model"""
    block_size: int = 128
    """tokens per packed training block"""
    lr: float = 3e-3
    """peak learning rate (AdamW)"""
    trust_remote_code: bool = False
    """allow a hub model's own Python code to run when loading ``init`` (off unless you trust the source)"""


def run(cfg: PretrainConfig, ctx: StageContext) -> dict:
    data_path, out_dir, accelerator, log = ctx.resolve(cfg.data, key="data"), ctx.stage_dir, ctx.accelerator, ctx.log
    texts = load_texts(data_path)
    if cfg.init:
        init = ctx.model(cfg.init, "init")
        tokenizer = load_tokenizer(init, trust_remote_code=cfg.trust_remote_code)
        model = load_causal_lm(init, trust_remote_code=cfg.trust_remote_code)
    else:
        tokenizer = train_bpe_tokenizer(texts, vocab_size=cfg.arch.vocab_size)
        model = build_tiny_causal_lm(cfg.arch, tokenizer, seed=cfg.seed)
    if cfg.block_size > model.config.max_position_embeddings:
        raise ValueError(f"pretrain.block_size {cfg.block_size} exceeds the model's context {model.config.max_position_embeddings}")
    blocks = pack_documents(tokenizer, texts, cfg.block_size)
    metrics = train_lm(
        model,
        n_examples=len(blocks),
        collate=lambda idx: collate_packed([blocks[i] for i in idx], tokenizer.pad_token_id),
        loss_tokens=[b.n_loss_tokens for b in blocks],
        cfg=cfg,
        accelerator=accelerator,
        log=log,
        progress_desc="pretrain",
        checkpoint=LoopCheckpoint(checkpoint_dir(out_dir), cfg, accelerator, log, "pretrain"),
    )
    state_dict = gathered_state_dict(accelerator, model)  # FSDP / ZeRO-3: every process takes part in the gather
    if accelerator.is_main_process:
        save_pretrained_atomic(accelerator.unwrap_model(model), tokenizer, out_dir / "model", state_dict=state_dict)
    metrics.update(n_documents=len(texts), n_blocks=len(blocks), n_parameters=sum(p.numel() for p in model.parameters()))
    return metrics
