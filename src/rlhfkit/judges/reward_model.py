"""A trained reward model as a preference function: P(a ≻ b | prompt) = σ(r(prompt, a) − r(prompt, b)).

This is the Bradley-Terry model the reward model was trained under, so the probability is the
model's own calibrated belief (``eval-rm`` reports its calibration error). Used by DPO/DNO and by
``rlhfkit label`` as an AI judge in place of people.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from rlhfkit.models.reward_eval import score_each_once, sigmoid


class RewardModelPreference:
    """Implements :class:`rlhfkit.judges.base.PreferenceFunction` with a reward model (or ensemble)."""

    def __init__(self, model_dir: str | Path, device=None, batch_size: int = 32):
        from rlhfkit.models.reward_files import load_reward_model  # lazy: torch; judges.spec imports this module

        self.model = load_reward_model(model_dir, device=device, batch_size=batch_size)
        if self.model.info.kind not in ("reward", "orm"):
            raise ValueError(f"{model_dir}: a {self.model.info.kind} model is not a preference (use a reward model)")
        self.name = f"reward-model:{Path(model_dir).name}"

    def prob(self, items: Sequence[tuple[str, str, str]]) -> list[float]:
        r = score_each_once(self.model.score, [t for p, a, b in items for t in ((p, a), (p, b))])
        return [sigmoid(ra - rb) for ra, rb in zip(r[0::2], r[1::2])]
