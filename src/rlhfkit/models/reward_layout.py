"""How (prompt, response) texts enter a scalar model's forward: right-padded rows, or one packed row.

A Bradley-Terry batch holds a ranking's K responses to one prompt; padded, the prompt is encoded K
times and every row is padded to the longest. Packed, each prompt is encoded once: one unpadded
row ``[prompt₀ response₀₁ response₀₂ … prompt₁ …]`` in which each response attends to its prompt and
itself only (``models.view_attention``), the layout DPO's pairs use (``data.pairs.collate_pairs_packed``).
Both give the same values to float rounding (``tests/test_reward_packed.py`` compares values and gradients).

Either way the token ids come from a ``TokenCache``: ``models.reward.encode`` run once for each distinct text
and kept, so a training run tokenizes its texts once (as TRL's RewardTrainer tokenizes its dataset before
training), not at every step of every epoch.
"""
from __future__ import annotations

import warnings
from enum import StrEnum
from typing import Iterable, Sequence

import torch

from rlhfkit.data.chat import Prompt
from rlhfkit.data.collate import collate_shared_prefixes, encode_prompt
from rlhfkit.models.reward import HeadInfo, ScalarModel, collate, encode
from rlhfkit.models.view_attention import supports_view_attention


class RewardLayout(StrEnum):
    """How a batch of (prompt, response) texts enters a reward, outcome or cost model's forward pass.

    Both compute the same function (to float rounding; the tests compare values and gradients). Time of
    one ``train_rm`` batch's forward + backward (tokenizing included, as every step did before the
    ``TokenCache``), padded over packed, on 16 pairs of the embedded task, 2-core CPU loaded by another job,
    1 thread, medians of per-round ratios over 7 alternated rounds (prompts 34 / 66 tokens, responses 24):

    ==========================================  ==============  ==============
    backbone (Llama shapes)                     prompts 1.4×    prompts 2.8×
    ==========================================  ==============  ==============
    hidden 32, 2 layers (the tests' model)      1.14            1.19
    hidden 128, 4 layers, V = 512 (bench tiny)  1.66            1.77
    hidden 256, 6 layers, V = 49 152            1.94            1.86
    ==========================================  ==============  ==============
    """

    padded = "padded"
    """one right-padded row per (prompt, response): works with any backbone (DPO's ``concatenated``)"""
    packed = "packed"
    """one unpadded row, each distinct prompt once, attention by views; a causal backbone whose attention is
    plain and pluggable only (``supports_view_attention``: no sliding window, no activation checkpointing).
    Others are padded: an encoder silently (it attends both ways, so it has no views), a causal model with a warning"""


def effective_layout(net: ScalarModel, layout: RewardLayout) -> RewardLayout:
    """``layout``, or padded where ``net`` cannot run packed (see ``RewardLayout.packed``)."""
    if layout != RewardLayout.packed or not net.info.causal:
        return RewardLayout.padded
    if supports_view_attention(net.backbone):
        return RewardLayout.packed
    warnings.warn(f"{type(net.backbone).__name__}: attention is not plain causal and pluggable, or activation "
                  "checkpointing is on (see supports_view_attention); the packed layout falls back to padded")
    return RewardLayout.padded


class TokenCache:
    """The token ids of (prompt, response) texts for one tokenizer and ``HeadInfo``, each computed once.

    ``encode(prompt, response)`` is ``models.reward.encode``'s (input_ids, token_type_ids) and ``prompt(p)``
    ``data.collate.encode_prompt``'s ids, each computed by that function on its first request and kept: the
    cache holds nothing those functions did not return, so a batch collated from it is the same, token for
    token, as one encoded afresh. The lists are shared between batches: read them, never modify them.

    Make one per training run, ``fill`` it with the training texts before the first step, and pass it to
    every collation (``collate_texts``); a scoring call makes its own. Size: Python int lists, 50 to 60 bytes
    a token (ids, token types and each prompt's ids; measured): ≈ 0.2 GB a process for HH-RLHF's ~40k texts
    at a 96-token cap.
    """

    def __init__(self, tokenizer, info: HeadInfo):
        self.tokenizer, self.info = tokenizer, info
        self._texts: dict[tuple[Prompt, str], tuple[list[int], list[int]]] = {}
        self._prompts: dict[Prompt, list[int]] = {}

    def encode(self, prompt: Prompt, response: str) -> tuple[list[int], list[int]]:
        """``models.reward.encode(tokenizer, info, prompt, response)``: (input_ids, token_type_ids)."""
        key = (prompt, response)
        if key not in self._texts:
            self._texts[key] = encode(self.tokenizer, self.info, prompt, response)
        return self._texts[key]

    def prompt(self, prompt: Prompt) -> list[int]:
        """``data.collate.encode_prompt(tokenizer, prompt)``: the prefix a causal model's texts share."""
        if prompt not in self._prompts:
            self._prompts[prompt] = encode_prompt(self.tokenizer, prompt)
        return self._prompts[prompt]

    def fill(self, texts: Iterable[tuple[Prompt, str]]) -> TokenCache:
        """Encode every (prompt, response) of ``texts`` now (and, for a causal model, its prompt); returns self."""
        for prompt, response in texts:
            self.encode(prompt, response)
            if self.info.causal:
                self.prompt(prompt)
        return self

    def __len__(self) -> int:
        """Distinct (prompt, response) texts held."""
        return len(self._texts)


def pack_texts(tokens: TokenCache, texts: Sequence[tuple[Prompt, str]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(packed batch of ``data.collate.collate_shared_prefixes``, (T,) view of each text) for a causal model.

    Each text's ids are ``models.reward.encode``'s (through ``tokens``), so the packed views hold exactly its
    sequences. Texts whose sequence starts with the same prompt tokens share one copy of them; a sequence that
    does not start with its whole prompt (cut to ``max_len``) is a view of its own, prompt part and all.
    """
    groups: dict[tuple[int, ...], list[list[int]]] = {}
    where: list[tuple[tuple[int, ...], int]] = []
    for prompt, response in texts:
        ids, _ = tokens.encode(prompt, response)
        pre = tokens.prompt(prompt)
        key = tuple(pre) if len(ids) > len(pre) and ids[:len(pre)] == pre else ()  # () : no prefix shared
        suffixes = groups.setdefault(key, [])
        where.append((key, len(suffixes)))
        suffixes.append(ids[len(key):])
    first, n = {}, 0  # views are numbered group by group in the packed row
    for key, suffixes in groups.items():
        first[key], n = n, n + len(suffixes)
    batch = collate_shared_prefixes([(list(key), suffixes) for key, suffixes in groups.items()])
    return batch, torch.tensor([first[key] + j for key, j in where], dtype=torch.long)


def collate_texts(net: ScalarModel, tokens: TokenCache, texts: Sequence[tuple[Prompt, str]], layout: RewardLayout,
                  device) -> tuple[dict, torch.Tensor]:
    """(forward keyword arguments of ``ScalarModel``, (T,) row of its output for each text), on ``device``,
    in the ``effective_layout``; the ids from ``tokens``, which must be made for ``net.info``."""
    if tokens.info != net.info:
        raise ValueError(f"collate_texts: the TokenCache was made for {tokens.info}, the model is {net.info}")
    if effective_layout(net, layout) == RewardLayout.packed:
        batch, rows = pack_texts(tokens, texts)
        batch = {k: v.to(device) for k, v in batch.items()}
        batch["token_views"] = (batch.pop("view_index"), batch.pop("view_source"))
        return batch, rows.to(device)
    enc = [tokens.encode(p, r) for p, r in texts]
    batch = collate([e[0] for e in enc], None if net.info.causal else [e[1] for e in enc],
                    tokens.tokenizer.pad_token_id)
    return {k: v.to(device) for k, v in batch.items()}, torch.arange(len(texts), device=device)
