"""Tokenization and collation: SFT examples with prompt masking, and packed pretraining blocks.

One way to turn a prompt into model input: ``data.chat.render_prompt`` (chat template when the
tokenizer has one). Prompt and response are tokenized separately and concatenated as ids, so the
boundary between them is exact (tokenizing the joined string can merge the last prompt
character with the first response character and shift the mask by one).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Sequence

import torch

from rlhfkit.data.chat import Prompt, render_prompt
from rlhfkit.data.loading import DataError, Demonstration

IGNORE = -100


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of a prompt (a string or a conversation) through the one renderer, ``data.chat.render_prompt``."""
    # A chat template already carries its own BOS; plain prompts get none (our tokenizers add none).
    return tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]


def encode_response(tokenizer, response: str, add_eos: bool = True) -> list[int]:
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if add_eos else ids


@dataclass(frozen=True)
class TokenizedExample:
    """input_ids and labels (prompt positions are IGNORE) of one demonstration."""

    input_ids: list[int]
    labels: list[int]

    @property
    def n_loss_tokens(self) -> int:
        # Position t predicts token t+1, so the first label never has a loss.
        return sum(1 for x in self.labels[1:] if x != IGNORE)


class Truncation(StrEnum):
    """What to do with an example longer than ``max_len``."""

    error = "error"
    """refuse it: a DataError naming the file and line (the default: nothing is cut silently)"""
    left = "left"
    """cut the prompt's beginning (its latest turns stay), then the response's end if still too long"""
    right = "right"
    """cut the response's end (the prompt stays whole); a prompt that alone fills max_len is still an error"""


def fit_to_length(prompt: list[int], responses: Sequence[list[int]], max_len: int, truncation: Truncation,
                  where: str) -> tuple[list[int], list[list[int]], bool]:
    """(prompt, responses, truncated) with len(prompt) + len(longest response) <= max_len.

    Several responses (a pair's chosen and rejected) share the prompt, so the longest decides.
    """
    longest = max(len(r) for r in responses)
    if len(prompt) + longest <= max_len:
        return prompt, list(responses), False
    if len(prompt) >= max_len and truncation is not Truncation.left:
        raise DataError(f"{where}: prompt is {len(prompt)} tokens, longer than the model's context ({max_len})")
    if truncation is Truncation.error:
        raise DataError(f"{where}: prompt + response is {len(prompt) + longest} tokens, longer than max_len ({max_len}); "
                        f"set truncation: left or right to cut it")
    if truncation is Truncation.left:
        keep = max(1, max_len - longest)
        prompt = prompt[-keep:]
    budget = max_len - len(prompt)
    return prompt, [r[:budget] for r in responses], True


def tokenize_demonstrations(tokenizer, demos: Sequence[Demonstration], max_len: int,
                            truncation: Truncation = Truncation.error) -> tuple[list[TokenizedExample], int]:
    """Tokenized SFT demonstrations and how many were truncated; too long under ``error`` is a DataError naming the record."""
    out, n_cut = [], 0
    for d in demos:
        p, (r,), cut = fit_to_length(encode_prompt(tokenizer, d.prompt), [encode_response(tokenizer, d.response)],
                                     max_len, Truncation(truncation), d.where)
        n_cut += cut
        out.append(TokenizedExample(p + r, [IGNORE] * len(p) + r))
    return out, n_cut


def pad_batch(seqs: Sequence[Sequence[int]], pad_value: int, side: str = "right") -> torch.Tensor:
    """(B, T_max) tensor of ``seqs`` padded on ``side``."""
    t = max(len(s) for s in seqs)
    rows = []
    for s in seqs:
        pad = [pad_value] * (t - len(s))
        rows.append(list(s) + pad if side == "right" else pad + list(s))
    return torch.tensor(rows, dtype=torch.long)


def collate_sft(examples: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    ids = pad_batch([e.input_ids for e in examples], pad_id)
    labels = pad_batch([e.labels for e in examples], IGNORE)
    mask = pad_batch([[1] * len(e.input_ids) for e in examples], 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_sft_unpadded(examples: Sequence[TokenizedExample]) -> dict[str, torch.Tensor]:
    """Every example in ONE unpadded row ``[example₀ example₁ …]`` of N tokens, for view attention
    (``models.view_attention``): each example is a view that attends causally to itself only
    (``collate_shared_prefixes`` with empty prefixes).

    - ``input_ids``, ``labels``, ``position_ids`` (1, N): positions restart at 0 for each example, and
      each example's first label is IGNORE (the row's previous token belongs to another example);
      the same loss terms as ``collate_sft``'s padded rows;
    - ``view_index`` (B, L): view i's row positions, right-padded with its first position (never
      attended: causal); ``view_source`` (N,): token j of example i reads its output at i · L + j.
    """
    batch = collate_shared_prefixes([((), [e.input_ids]) for e in examples])
    labels = [label for e in examples for label in [IGNORE, *e.labels[1:]]]
    return {"input_ids": batch["input_ids"], "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": batch["position_ids"], "view_index": batch["view_index"], "view_source": batch["view_source"]}


def collate_shared_prefixes(groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]]
                            ) -> dict[str, torch.Tensor]:
    """Groups (prefix, [suffix₁, suffix₂, …]) in ONE unpadded row ``[prefix₀ s₀₁ s₀₂ … prefix₁ s₁₁ …]`` of N
    tokens, for view attention (``models.view_attention``): view j = (its group's prefix, its own suffix), each prefix
    encoded once. Views are numbered in row order (group by group, suffix by suffix); a prefix may be empty.

    - ``input_ids``, ``position_ids`` (1, N): every suffix's positions continue from its prefix's end (each
      suffix restarts where the one before it did), the positions of the view as its own padded row;
    - ``view_index`` (V, L): view j's row positions, right-padded with its first position (never attended:
      causal); ``view_mask`` (V, L): 1 on its real tokens, the attention mask of the views as right-padded rows;
    - ``view_source`` (N,): where each token reads its attention output, flat (view · L + column): a prefix
      token from its group's first view, a suffix token from its own.
    """
    views = [(len(pre), len(s)) for pre, sufs in groups for s in sufs]
    if any(not sufs for _, sufs in groups) or any(p + s == 0 for p, s in views):
        raise ValueError("collate_shared_prefixes: every group needs a suffix and every view a token")
    length = max(p + s for p, s in views)
    ids, positions, index, mask, source = [], [], [], [], []
    for pre, sufs in groups:
        start, n_p, first = len(ids), len(pre), len(index)
        ids += pre
        positions += range(n_p)
        source += range(first * length, first * length + n_p)
        for s in sufs:
            v, rows = len(index), list(range(start, start + n_p)) + list(range(len(ids), len(ids) + len(s)))
            index.append(rows + [rows[0]] * (length - len(rows)))
            mask.append([1] * len(rows) + [0] * (length - len(rows)))
            source += range(v * length + n_p, v * length + n_p + len(s))
            ids += s
            positions += range(n_p, n_p + len(s))

    def t(x):
        return torch.tensor(x, dtype=torch.long)

    return {"input_ids": t([ids]), "position_ids": t([positions]), "view_index": t(index), "view_mask": t(mask),
            "view_source": t(source)}


@dataclass(frozen=True)
class PackedBlock:
    """A pretraining block: whole documents back to back, each ending with EOS.

    ``position_ids`` restart at 0 for every document, and the label of a document's first token
    is IGNORE: nothing is learned from predicting one document from the end of another.
    """

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]

    @property
    def n_loss_tokens(self) -> int:
        return sum(1 for x in self.labels[1:] if x != IGNORE)


def pack_documents(tokenizer, texts: Sequence[str], block_size: int) -> list[PackedBlock]:
    """Greedy packing of tokenized documents (+EOS) into blocks of at most ``block_size`` tokens.

    A document never straddles two blocks unless it is longer than a block, in which case it is
    cut into block-sized chunks (positions continue across the chunks of one document).
    """
    eos = tokenizer.eos_token_id
    blocks: list[PackedBlock] = []
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []

    def flush():
        nonlocal ids, labels, pos
        if ids:
            blocks.append(PackedBlock(ids, labels, pos))
        ids, labels, pos = [], [], []

    for text in texts:
        doc = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        if len(ids) + len(doc) > block_size:
            flush()
        for start in range(0, len(doc), block_size):
            piece = doc[start:start + block_size]
            if len(ids) + len(piece) > block_size:
                flush()
            first = IGNORE if start == 0 else piece[0]
            ids.extend(piece)
            labels.extend([first] + piece[1:])
            pos.extend(range(start, start + len(piece)))
    flush()
    return blocks


def collate_packed(blocks: Sequence[PackedBlock], pad_id: int) -> dict[str, torch.Tensor]:
    return {
        "input_ids": pad_batch([b.input_ids for b in blocks], pad_id),
        "labels": pad_batch([b.labels for b in blocks], IGNORE),
        "attention_mask": pad_batch([[1] * len(b.input_ids) for b in blocks], 0),
        "position_ids": pad_batch([b.position_ids for b in blocks], 0),
    }
