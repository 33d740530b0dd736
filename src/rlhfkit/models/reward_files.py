"""Scalar models as files: a fresh head on a backbone, and the directories they and ensembles live in.

The layout on disk is described in ``models.reward``; :func:`load_reward_model` loads a model or an
ensemble directory as a ``RewardModel`` or ``RewardEnsemble``.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from rlhfkit.io import atomic_write_json, partial_dir, replace_dir
from rlhfkit.models.loading import load_tokenizer, without_aliases
from rlhfkit.models.reward import (
    HEAD_JSON, HEAD_WEIGHTS, KINDS, REFERENCE_LM, HeadInfo, ScalarModel, is_encoder, separator_tokens,
)
from rlhfkit.models.reward_scorers import RewardEnsemble, RewardModel
from rlhfkit.models.step_likelihood import StepLikelihood
from rlhfkit.models.trainable import is_peft, merged_copy


def build_scalar_model(backbone_path: str | Path, kind: str = "reward", max_len: int = 256,
                       pooling: str = "last", separator: str = "\n", seed: int = 0, dropout: float | None = None,
                       step_likelihood: bool = False):
    """A fresh head on a pretrained backbone (causal LM directory or encoder), and its tokenizer.

    ``step_likelihood`` (a PRM on a causal LM): a frozen copy of the backbone's LM supplies
    ``models.step_likelihood.StepLikelihood`` features; the head's weight starts at zero, so the untrained
    PRM is the features' model alone (their weights are set by ``fit_step_likelihood``).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    config = AutoConfig.from_pretrained(str(backbone_path))
    kwargs = {}
    if dropout is not None:
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout"):
            if hasattr(config, key):
                kwargs[key] = dropout
    causal = not is_encoder(config)
    limit = getattr(config, "max_position_embeddings", max_len)
    if step_likelihood and (kind != "prm" or not causal):
        raise ValueError(f"step_likelihood is for a PRM on a causal LM, not a {kind} model on "
                         f"{'a causal' if causal else 'an encoder'} backbone")
    info = HeadInfo(kind=kind, pooling=pooling, causal=causal, max_len=min(max_len, limit), separator=separator,
                    step_likelihood=step_likelihood)
    tokenizer = load_tokenizer(backbone_path)
    backbone = AutoModel.from_pretrained(str(backbone_path), **kwargs)
    torch.manual_seed(seed)
    net = ScalarModel(backbone, info)
    if step_likelihood:
        net.likelihood = StepLikelihood(AutoModelForCausalLM.from_pretrained(str(backbone_path)),
                                        separator_tokens(tokenizer, separator))
        nn.init.zeros_(net.head.weight)
    return net, tokenizer


def save_scalar_model(net: ScalarModel, tokenizer, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """Atomically: backbone + tokenizer as a HF directory, head as safetensors + json.

    ``state_dict``: ``net``'s full weights gathered from a sharded ``net`` (``distributed.gathered_state_dict``:
    keys ``backbone.*``, ``head.*``, ``likelihood.*``), written in place of the modules' own.
    """
    out_dir = Path(out_dir)
    tmp = partial_dir(out_dir)
    if tmp.exists():
        shutil.rmtree(tmp)

    def part(module, prefix: str) -> dict:
        """save_pretrained's arguments for ``module``: its share of ``state_dict`` (``prefix`` cut), if given."""
        if state_dict is None:
            return {}
        return {"state_dict": without_aliases(module, {k[len(prefix):]: v for k, v in state_dict.items()
                                                       if k.startswith(prefix)})}

    if is_peft(net.backbone) and state_dict is not None:
        raise NotImplementedError("saving a LoRA backbone from gathered weights (FSDP, ZeRO-3) is not supported")
    # Under LoRA the backbone is saved merged (loads without peft) and the adapter beside it in adapter/.
    merged_copy(net.backbone).save_pretrained(tmp, safe_serialization=True, **part(net.backbone, "backbone."))
    if is_peft(net.backbone):
        net.backbone.save_pretrained(tmp / "adapter")
    tokenizer.save_pretrained(tmp)
    own = {f"head.{k}": v for k, v in net.head.state_dict().items()}
    if net.likelihood is not None:
        net.likelihood.lm.save_pretrained(tmp / REFERENCE_LM, safe_serialization=True,
                                          **part(net.likelihood.lm, "likelihood.lm."))
        own.update({f"likelihood.{k}": getattr(net.likelihood, k) for k in ("weight", "mean", "std")})
    # the file's keys: the head's without its prefix, the likelihood's with theirs
    tensors = {k.removeprefix("head."): state_dict[k] if state_dict is not None else v for k, v in own.items()}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / HEAD_WEIGHTS))
    atomic_write_json(tmp / HEAD_JSON, asdict(net.info))
    replace_dir(tmp, out_dir)
    return out_dir


def load_reward_model(path: str | Path, device=None, batch_size: int = 32, dtype: torch.dtype | None = None):
    """A :class:`RewardModel` (or :class:`RewardEnsemble`) from a directory, in eval mode.

    ``dtype``: the backbone's (and a PRM's reference LM's) dtype, as saved by default; the scalar head
    stays fp32 whatever it is (``models.precision``)."""
    loaded_as = {"dtype": dtype} if dtype is not None else {}
    path = Path(path)
    if (path / "ensemble.json").exists():
        spec = json.loads((path / "ensemble.json").read_text())
        members = [load_reward_model(path / m, device, batch_size, dtype) for m in spec["members"]]
        return RewardEnsemble(members, spec.get("reduce", "mean"), spec.get("k", 1.0))
    if not (path / HEAD_JSON).exists():
        raise FileNotFoundError(f"{path}: not a reward model directory (no {HEAD_JSON})")
    info = HeadInfo(**json.loads((path / HEAD_JSON).read_text()))
    net = ScalarModel(AutoModel.from_pretrained(str(path), **loaded_as), info)
    tensors = load_file(str(path / HEAD_WEIGHTS))
    net.head.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("likelihood.")})
    tokenizer = load_tokenizer(path)
    if info.step_likelihood:
        net.likelihood = StepLikelihood(AutoModelForCausalLM.from_pretrained(str(path / REFERENCE_LM), **loaded_as),
                                        separator_tokens(tokenizer, info.separator))
        with torch.no_grad():
            for k in ("weight", "mean", "std"):
                getattr(net.likelihood, k).copy_(tensors[f"likelihood.{k}"])
    net.eval()
    if device is not None:
        net.to(device)
    return RewardModel(net, tokenizer, device, batch_size)

