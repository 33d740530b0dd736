"""PPO-ptx (Ouyang et al. 2022, "Training language models to follow instructions with human feedback", eq. 2):

    objective(φ) = E_(x,y)∼π_φ [ r(x, y) − β log(π_φ(y|x) / π_SFT(y|x)) ] + γ E_x∼D [ log π_φ(x) ]

The last term keeps the policy a good model of demonstrations D while RL moves it: a reward model that
cannot check some capability (a tiny RM cannot verify "7 + 9 = 16") gives the tokens that carry it
advantages unrelated to their correctness, and the capability drifts (InstructGPT's "alignment tax").
Each optimizer step of the RL update adds γ × the mean NLL over the response tokens of a batch of
demonstrations (:class:`PtxTerm`), drawn with the update's own seeded generator, so a resumed run
draws what an uninterrupted one did.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from rlhfkit.data.collate import TokenizedExample, collate_sft
from rlhfkit.training import token_loss_sum


@dataclass
class PtxTerm:
    """γ and the tokenized demonstrations of the PPO-ptx term."""

    examples: Sequence[TokenizedExample]
    coef: float  # γ
    batch_size: int  # demonstrations per optimizer step, over all processes
    pad_id: int

    def backward(self, policy, accelerator, generator: torch.Generator, rank: int, world: int) -> torch.Tensor:
        """Draw ``batch_size`` demonstrations (the same draw on every process), run this process's share and
        backpropagate γ × their NLL over the whole draw's response tokens (times ``world``: DDP's mean over
        processes then gives the gradient of the global batch's mean NLL). Returns this process's part of
        that mean (0-d, detached): the parts sum to the batch's mean NLL over processes."""
        if self.batch_size % world:
            raise ValueError(f"ptx_batch_size {self.batch_size} must be divisible by the {world} processes")
        draw = torch.randint(len(self.examples), (self.batch_size,), generator=generator).tolist()
        n_tokens = sum(self.examples[i].n_loss_tokens for i in draw)
        per = self.batch_size // world
        mine = [self.examples[i] for i in draw[rank * per:(rank + 1) * per]]
        batch = {k: v.to(accelerator.device) for k, v in collate_sft(mine, self.pad_id).items()}
        nll = token_loss_sum(policy, batch) / max(n_tokens, 1)
        accelerator.backward(self.coef * nll * world)
        return nll.detach()
