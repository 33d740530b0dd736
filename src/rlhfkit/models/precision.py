"""Mixed precision done one way: the transformer under bf16 autocast, fp32 where precision decides the result.

Under ``mixed_precision: bf16`` accelerate runs each prepared model's forward under ``torch.autocast``
(bf16 matmuls, fp32 master weights and optimizer state). What stays fp32:

- log-softmax over the vocabulary and every loss (``policy_losses.logprobs_from_logits`` casts the logits);
- the scalar heads, the critic's value head and a reward model's head (:func:`fp32_head`): autocast would
  otherwise run the ``Linear(H, 1)`` in bf16 and round a reward or value to 8 mantissa bits, which
  whitening, GAE and the Bradley-Terry margin then amplify;
- the optimizer state (accelerate never casts the parameters of a prepared model).

Frozen models that never train (PPO's reference and reward models) are loaded in bf16 under bf16
(:func:`frozen_dtype`): they run outside autocast, and half the memory of four models is the point of
mixed precision on one device. Their heads stay fp32 (``models.reward_files.load_reward_model``).
"""
from __future__ import annotations

import torch


def resolve_mixed_precision(mode) -> str:
    """A config's ``mixed_precision`` (``auto``, ``no``, ``bf16``, ``fp16``; an Enum or str) → what accelerate
    gets: ``auto`` is bf16 on a CUDA device that supports it, ``no`` otherwise."""
    mode = getattr(mode, "value", mode)
    if mode == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return str(mode)


def frozen_dtype(mode) -> torch.dtype | None:
    """The dtype to load a frozen (never trained) model in under ``mixed_precision`` ``mode``: bf16 under bf16,
    fp16 under fp16, None (as saved, fp32) otherwise."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_mixed_precision(mode))


def fp32_head(head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """``head(hidden)`` in fp32 whatever the backbone's dtype and any enclosing autocast: (…, H) → (…, out).

    The head's own parameters must be fp32 (they are: heads are built and loaded in fp32)."""
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return head(hidden.float())
