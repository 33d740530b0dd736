"""A pairwise preference model: reads the prompt and BOTH responses and outputs P(a ≻ b) directly.

A Bradley-Terry reward model scores each response alone, so its preference σ(r(a) − r(b)) is
transitive by construction: it cannot represent a ≻ b ≻ c ≻ a. The pairwise model sees the two
responses together, f(a, b) = σ(head(backbone(prompt, "A:", a, "B:", b))), and can.

A single forward f(a, b) has a position bias (it need not equal 1 − f(b, a)). We symmetrize by
averaging both orders (as the DNO paper's preference model and PairRM do):

    P(a ≻ b) = ½ (f(a, b) + 1 − f(b, a))

Computed for the pair in a canonical order (by string) and returned as p or 1 − p, so
P(a ≻ b) + P(b ≻ a) = 1 holds exactly in floating point, and P(a ≻ a) = ½.

Training is a recipe's job (``recipes.intransitive.train_comparison_model``): comparisons
{prompt, chosen, rejected}, each shown in both orders (target 1 for f(chosen, rejected), 0 for
f(rejected, chosen)), binary cross-entropy. This module loads and applies the trained model.

On disk: the scalar-model directory of ``rlhfkit.models.reward`` plus ``preference_model.json``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from rlhfkit.data.collate import encode_prompt
from rlhfkit.models.reward import collate
from rlhfkit.models.reward_files import load_reward_model

MARKER = "preference_model.json"


def pair_text_ids(tokenizer, prompt: str, a: str, b: str, max_len: int) -> list[int]:
    """prompt (project rendering) + "Response A:\\n" a "\\nResponse B:\\n" b + EOS, cut from the left."""
    body = tokenizer(f"Response A:\n{a}\nResponse B:\n{b}", add_special_tokens=False)["input_ids"]
    ids = encode_prompt(tokenizer, prompt) + body + [tokenizer.eos_token_id]
    return ids[-max_len:]


class PairwisePreferenceModel:
    """A trained pairwise preference model; implements PreferenceFunction."""

    name = "preference-model"

    def __init__(self, net, tokenizer, device=None, batch_size: int = 32):
        self.net, self.tokenizer = net, tokenizer
        self.device = device or next(net.parameters()).device
        self.batch_size = batch_size

    def logits(self, items: Sequence[tuple[str, str, str]], grad: bool = False) -> torch.Tensor:
        """f's logit for each (prompt, a, b) in the given order, (N,)."""
        out = []
        ctx = torch.enable_grad() if grad else torch.no_grad()
        with ctx:
            for s in range(0, len(items), self.batch_size):
                seqs = [pair_text_ids(self.tokenizer, p, a, b, self.net.info.max_len) for p, a, b in items[s:s + self.batch_size]]
                batch = collate(seqs, None, self.tokenizer.pad_token_id)
                out.append(self.net(**{k: v.to(self.device) for k, v in batch.items()}))
        return torch.cat(out) if out else torch.zeros(0)

    def prob(self, items: Sequence[tuple[str, str, str]]) -> list[float]:
        self.net.eval()
        canon = [(p, a, b) if a <= b else (p, b, a) for p, a, b in items]
        both = [(p, x, y) for p, x, y in canon] + [(p, y, x) for p, x, y in canon]
        f = torch.sigmoid(self.logits(both).double()).tolist()
        n = len(items)
        out = []
        for i, (_, a, b) in enumerate(items):
            if a == b:
                out.append(0.5)
                continue
            p_canon = 0.5 * (f[i] + 1.0 - f[n + i])
            out.append(p_canon if a <= b else 1.0 - p_canon)
        return out


def load_preference_model(path: str | Path, device=None, batch_size: int = 32) -> PairwisePreferenceModel:
    path = Path(path)
    if not (path / MARKER).exists():
        raise FileNotFoundError(f"{path}: not a pairwise preference model directory (no {MARKER})")
    rm = load_reward_model(path, device=device, batch_size=batch_size)
    return PairwisePreferenceModel(rm.net, rm.tokenizer, rm.device, batch_size)
