"""Trained scalar models as scorers of texts: ``RewardModel`` (reward, ORM, cost: ``score``; PRM: ``step_scores``)
and ``RewardEnsemble`` (k reward models as one reward). ``models.reward_files.load_reward_model`` builds them from
a directory; the network itself, its encoding and its step logits are ``models.reward``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from rlhfkit.data.steps import split_steps
from rlhfkit.models.reward import ScalarModel, step_logits
from rlhfkit.models.reward_layout import RewardLayout, TokenCache, collate_texts


class RewardModel:
    """A trained scalar model in eval mode: ``score`` for reward/orm/cost, ``step_scores`` for a PRM."""

    def __init__(self, net: ScalarModel, tokenizer, device=None, batch_size: int = 32):
        self.net, self.tokenizer, self.info = net, tokenizer, net.info
        self.device = device or next(net.parameters()).device
        self.batch_size = batch_size
        self.name = f"{self.info.kind}-model"

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """One scalar per (prompt, response): reward, ORM log-odds, or cost (negative = safe); padded rows of
        ``batch_size`` texts (``models.reward_layout.collate_texts``)."""
        self.net.eval()  # dropout off
        tokens = TokenCache(self.tokenizer, self.info)
        texts = list(zip(prompts, responses))
        out: list[float] = []
        for s in range(0, len(texts), self.batch_size):
            batch, rows = collate_texts(self.net, tokens, texts[s:s + self.batch_size], RewardLayout.padded, self.device)
            out.extend(self.net(**batch)[rows].tolist())
        return out

    @torch.no_grad()
    def step_scores(self, prompts: Sequence[str], responses: Sequence[str]) -> list[list[float]]:
        """P(steps 1..k are right) for each step k of each response (``data.steps.split_steps``: a step is a line)."""
        self.net.eval()
        steps = [split_steps(r) for r in responses]
        logits = step_logits(self.net, self.tokenizer, prompts, steps, self.batch_size, self.device)
        return [[1.0 / (1.0 + math.exp(-z)) for z in row] for row in logits]


class RewardEnsemble:
    """k reward models as one reward: mean, min, or mean − k·std (an uncertainty penalty)."""

    def __init__(self, members: Sequence[RewardModel], reduce: str = "mean", k: float = 1.0):
        if reduce not in ("mean", "min", "mean_minus_std"):
            raise ValueError(f"reduce must be mean, min or mean_minus_std, got {reduce!r}")
        self.members, self.reduce, self.k = list(members), reduce, k
        self.info = self.members[0].info
        self.name = f"ensemble-{reduce}"

    def member_scores(self, prompts, responses) -> torch.Tensor:
        # float64: the members' scores are Python floats; reducing them in float32 would round them first.
        return torch.tensor([m.score(prompts, responses) for m in self.members], dtype=torch.float64)  # (M, N)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        s = self.member_scores(prompts, responses)
        if self.reduce == "mean":
            return s.mean(0).tolist()
        if self.reduce == "min":
            return s.min(0).values.tolist()
        # Uncertainty penalty: members disagree most where the reward model is extrapolating.
        std = s.std(0, unbiased=True) if len(self.members) > 1 else torch.zeros(s.shape[1], dtype=s.dtype)
        return (s.mean(0) - self.k * std).tolist()
