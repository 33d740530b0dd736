"""What makes a loaded model ready to train, the same in every stage: LoRA, gradient checkpointing,
dropout off; and saving the result as a plain model (plus the adapter) that loads without peft.

Every training stage (SFT, the reward models, DPO, DNO, PPO/GRPO/RLOO) calls
:func:`make_trainable` with its ``lora`` section and ``gradient_checkpointing`` flag, and saves
with :func:`save_trained`. Under LoRA (``lora.r > 0``) the frozen reference of DPO, DNO and PPO
is this same model with its adapter disabled (:func:`reference_mode`): no second copy.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from peft import LoraConfig, get_peft_model

from rlhfkit.io import partial_dir, replace_dir
from rlhfkit.models.loading import save_pretrained_atomic

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters (peft); the same keys in every training stage."""

    r: int = 0
    """adapter rank; 0 trains every weight"""
    alpha: float = 16.0
    """scaling numerator: the update is (alpha / r) · B·A"""
    dropout: float = 0.0
    """dropout on the adapter's input (kept at 0 in RL, where the ratio must compare one function)"""
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    """module names that get adapters (Llama/Qwen/Mistral names by default)"""
    merge: bool = True
    """also save the adapter merged into the base: ``model/`` is then a plain HF directory that loads
    without peft (``adapter/`` holds the adapter alone either way); false: ``model/`` is the adapter"""

    def __post_init__(self):
        if self.r < 0:
            raise ValueError(f"lora.r must be >= 0, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.r > 0 and not self.target_modules:
            raise ValueError("lora.target_modules is empty")

    @property
    def enabled(self) -> bool:
        return self.r > 0


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere: PPO's ratio and DPO's step-0 identity compare the same function."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if hasattr(m, "attention_dropout") and isinstance(m.attention_dropout, float):
            m.attention_dropout = 0.0  # HF attention reads a float attribute, not a Dropout module
    cfg = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        if cfg is not None and isinstance(getattr(cfg, key, None), float):
            setattr(cfg, key, 0.0)


def add_lora(model: torch.nn.Module, lora: LoRAConfig):
    """``model`` with adapters on ``lora.target_modules``; only the adapters train (peft freezes the rest)."""
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in lora.target_modules if t in present]
    if not targets:
        raise ValueError(f"lora.target_modules {list(lora.target_modules)}: none is a module of this model "
                         f"(e.g. {sorted(present)[:12]})")
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets)
    return get_peft_model(model, cfg)


def make_trainable(model: torch.nn.Module, lora: LoRAConfig, gradient_checkpointing: bool = False):
    """LoRA when ``lora.r > 0`` (else every weight trains), and activation checkpointing when asked."""
    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad (the embeddings are frozen under LoRA).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
    if lora.enabled:
        model = add_lora(model, lora)
    return model


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


@contextlib.contextmanager
def reference_mode(model):
    """The frozen reference of a LoRA policy: the same model with its adapter disabled (a no-op otherwise)."""
    from rlhfkit.generation import unwrap  # lazy: cycle with generation, which imports reference_mode

    inner = unwrap(model)
    with (inner.disable_adapter() if is_peft(inner) else contextlib.nullcontext()):
        yield inner


def merged_copy(model):
    """A plain model equal to ``model`` (adapter merged into a copy; ``model`` itself keeps training)."""
    return copy.deepcopy(model).merge_and_unload() if is_peft(model) else model


def merged_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of each entry of the plain model's state dict that ``model`` stands for, for an inference
    engine holding its own copy of the policy (``engines.vllm``). Under LoRA an adapted weight is W + (alpha / r)·B·A
    (peft's ``get_delta_weight``, what ``merged_copy`` adds), made one module at a time without touching ``model``
    (no deep copy, no merge and unmerge drifting the trained weights); the adapter's own tensors are left out and
    the names are those of ``merged_copy(model).state_dict()``."""
    if not is_peft(model):
        yield from model.state_dict().items()
        return
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    adapted = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    with torch.no_grad():
        for key, tensor in base.state_dict().items():
            if ".lora_" in key:
                continue
            if ".base_layer." not in key:
                yield key, tensor
                continue
            name, leaf = key.rsplit(".base_layer.", 1)
            layer = adapted[name]
            if leaf == "weight":
                for adapter in layer.active_adapters:
                    if adapter in layer.lora_A:
                        tensor = tensor + layer.get_delta_weight(adapter).to(tensor.dtype)
            yield f"{name}.{leaf}", tensor


def save_trained(model, tokenizer, stage_dir: str | Path, lora: LoRAConfig, name: str = "model",
                 state_dict: dict | None = None) -> Path:
    """Save a trained causal LM as ``stage_dir/<name>`` (atomic), and under LoRA its adapter as ``stage_dir/adapter``.

    With ``lora.merge`` (default) ``<name>/`` is the merged plain model; without, it is the adapter
    (``models.loading.load_causal_lm`` loads either). ``state_dict``: the full weights gathered from a sharded
    ``model`` (``distributed.gathered_state_dict``), written in place of the model's own.
    """
    stage_dir = Path(stage_dir)
    if not is_peft(model):
        return save_pretrained_atomic(model, tokenizer, stage_dir / name, state_dict=state_dict)
    if state_dict is not None:
        raise NotImplementedError("saving a LoRA model from gathered weights (FSDP, ZeRO-3) is not supported")
    adapter = stage_dir / ("adapter" if name == "model" else f"{name}_adapter")
    tmp = partial_dir(adapter)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, adapter)
    if not lora.merge:
        return save_pretrained_atomic(model, tokenizer, stage_dir / name)
    return save_pretrained_atomic(merged_copy(model), tokenizer, stage_dir / name)
