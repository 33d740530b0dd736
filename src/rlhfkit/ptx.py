"""PPO-ptx (Ouyang et al. 2022, "Training language models to follow instructions with human feedback", eq. 2):

    objective(φ) = E_(x,y)∼π_φ [ r(x, y) − β log(π_φ(y|x) / π_SFT(y|x)) ] + γ E_x∼D [ log π_φ(x) ]

The last term keeps the policy a good model of D while RL moves it: a reward model that cannot check some
capability (a tiny RM cannot verify "7 + 9 = 16") gives the tokens that carry it advantages unrelated to
their correctness, and the capability drifts (InstructGPT's "alignment tax"). D is InstructGPT's
pretraining distribution, or demonstrations (:func:`load_ptx_examples` reads either). Each optimizer step
of the RL update adds γ × the mean NLL over the loss tokens (a demonstration's response tokens, a corpus
block's every token) of a batch of D (:class:`PtxTerm`), drawn with the update's own seeded generator, so
a resumed run draws what an uninterrupted one did.

Which D matters: demonstrations also pull the policy back toward their style, which preferences may be
trying to move it away from (the quickstart's demonstrators write a filler line the annotators
disprefer); a pretraining corpus carries the capability (the arithmetic) without that style.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from rlhfkit.data.collate import (
    PackedBlock, TokenizedExample, Truncation, collate_packed, collate_sft, pack_documents, tokenize_demonstrations,
)
from rlhfkit.data.loading import iter_records, load_demonstrations, load_texts
from rlhfkit.training import token_loss_sum


def is_text_corpus(path: str | Path) -> bool:
    """A pretraining corpus (a ``.txt`` file, or records with ``text`` and no ``prompt``/``messages``), not
    demonstrations."""
    if Path(path).suffix == ".txt":
        return True
    first = next(iter(iter_records(path)), None)
    return first is not None and "text" in first.record and not {"prompt", "messages"} & set(first.record)


def load_ptx_examples(path: str | Path, tokenizer, context: int, block_size: int) -> tuple[list, Callable]:
    """D of the ptx term and its collate function: a pretraining corpus packed into ``block_size``-token blocks
    as the pretrain stage packs it (every token a loss token, documents never attend across), or demonstrations
    (loss on the response tokens; one longer than ``context`` is an error naming its file and line)."""
    if is_text_corpus(path):
        if block_size > context:
            raise ValueError(f"ptx_block_size {block_size} exceeds the policy's context {context}")
        return pack_documents(tokenizer, load_texts(path), block_size), collate_packed
    examples, _ = tokenize_demonstrations(tokenizer, load_demonstrations(path), context, Truncation.error)
    return examples, collate_sft


@dataclass
class PtxTerm:
    """γ and the tokenized demonstrations of the PPO-ptx term."""

    examples: Sequence[TokenizedExample] | Sequence[PackedBlock]
    coef: float  # γ
    batch_size: int  # examples per optimizer step, over all processes
    pad_id: int
    collate: Callable = collate_sft  # collate_packed for a corpus's blocks

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
        batch = {k: v.to(accelerator.device) for k, v in self.collate(mine, self.pad_id).items()}
        nll = token_loss_sum(policy, batch) / max(n_tokens, 1)
        accelerator.backward(self.coef * nll * world)
        return nll.detach()
