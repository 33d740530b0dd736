"""Loading and saving models through the ``transformers`` Auto classes.

Every model the project writes is a normal Hugging Face directory (``config.json``,
``model.safetensors``, tokenizer files) that ``AutoModelForCausalLM.from_pretrained`` loads in a
fresh process. Writes are atomic: into ``<dir>.partial`` then renamed.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerBase, Qwen2Config

from rlhfkit.config import coerce_enums
from rlhfkit.io import partial_dir, replace_dir
from rlhfkit.models.local import resolve_pretrained


class ModelFamily(StrEnum):
    """Which ``transformers`` config class builds a from-scratch model."""

    llama = "llama"
    qwen2 = "qwen2"


@dataclass(frozen=True)
class TinyModelConfig:
    """Architecture of a from-scratch model (a Llama- or Qwen2-style config of ``transformers``)."""

    family: ModelFamily = ModelFamily.llama
    """``llama`` or ``qwen2``: which transformers config class builds the model"""
    hidden_size: int = 128
    """width of the residual stream"""
    num_layers: int = 4
    """number of decoder layers"""
    num_heads: int = 4
    """attention heads (key/value heads too)"""
    intermediate_size: int = 384
    """MLP hidden width"""
    max_position_embeddings: int = 256
    """longest sequence (prompt + response) the model handles"""
    vocab_size: int = 512
    """size of the byte-level BPE vocabulary trained on the corpus"""
    tie_word_embeddings: bool = True
    """share input embedding and output projection weights"""

    def __post_init__(self):
        coerce_enums(self)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")


def build_tiny_causal_lm(arch: TinyModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0):
    """A randomly initialised causal LM from a ``transformers`` config; no home-made layers."""
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_heads,
        intermediate_size=arch.intermediate_size,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=arch.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attention_dropout=0.0,
    )
    cfg = LlamaConfig(**common) if arch.family == "llama" else Qwen2Config(**common)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)


def _adapter_base(path: Path) -> str | None:
    """The base model a LoRA adapter directory (``adapter_config.json``, no config.json) was trained on."""
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
    return None


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of any model reference (see ``models.local``), with a pad token (EOS if it had none)."""
    path = resolve_pretrained(path)
    if not any(path.glob("tokenizer*")) and _adapter_base(path):
        path = resolve_pretrained(_adapter_base(path))
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        # Common for pretrained checkpoints; every scoring path reads the last real token from the
        # attention mask, never from "first pad", so pad == eos is safe here.
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str | Path, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """Any causal LM by reference (directory, adapter directory, GGUF, package, hub name), in eval mode.

    A LoRA adapter directory is loaded on its base and merged: the result is a plain model.
    """
    path = resolve_pretrained(path)
    kwargs = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    base = _adapter_base(path)
    if base is not None:
        model = PeftModel.from_pretrained(load_causal_lm(base, dtype, trust_remote_code), str(path)).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    model.eval()
    return model


def save_pretrained_atomic(model, tokenizer, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """Save a model and its tokenizer as a Hugging Face directory, atomically.

    ``state_dict``: the weights to write instead of the model's own (the full weights gathered from a
    model sharded by FSDP or ZeRO-3, ``distributed.gathered_state_dict``); the model gives the config.
    """
    out_dir = Path(out_dir)
    tmp = partial_dir(out_dir)
    if tmp.exists():
        shutil.rmtree(tmp)
    if state_dict is not None:
        state_dict = without_aliases(model, state_dict)
    model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {}))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    replace_dir(tmp, out_dir)
    return out_dir


def without_aliases(model, state_dict: dict) -> dict:
    """``state_dict`` less the second name of each parameter ``model`` holds under two (tied embeddings:
    ``lm_head.weight`` is ``model.embed_tokens.weight``). A gathered state dict holds such a weight under both
    names, as separate tensors; ``save_pretrained`` drops the alias only when it sees one storage, so the file
    would differ from the one an unsharded model writes. Names as the gather gives them (no activation
    checkpointing wrapper in them)."""
    def clean(name: str) -> str:
        return name.replace("._checkpoint_wrapped_module", "")

    first = {clean(n) for n, _ in model.named_parameters()}
    aliases = {clean(n) for n, _ in model.named_parameters(remove_duplicate=False)} - first
    return {k: v for k, v in state_dict.items() if k not in aliases}


def model_config(path: str | Path):
    path = resolve_pretrained(path)
    base = _adapter_base(path)
    return AutoConfig.from_pretrained(str(resolve_pretrained(base) if base else path))
