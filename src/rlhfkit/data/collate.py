"""Tokenization and collation: SFT examples with prompt masking, and packed pretraining blocks.

One way to turn a prompt into model input: ``prompt_text`` (chat template when the tokenizer
has one). Prompt and response are tokenized separately and concatenated as ids, so the
boundary between them is exact (tokenizing the joined string can merge the last prompt
character with the first response character and shift the mask by one).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from rlhfkit.data.loading import DataError, Demonstration

IGNORE = -100


def prompt_text(tokenizer, prompt: str) -> str:
    """The text the model sees before its response: the chat template's user turn if it has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    return prompt


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    text = prompt_text(tokenizer, prompt)
    # A chat template already carries its own BOS; plain prompts get none (our tokenizers add none).
    return tokenizer(text, add_special_tokens=False)["input_ids"]


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


def tokenize_demonstrations(tokenizer, demos: Sequence[Demonstration], max_len: int) -> list[TokenizedExample]:
    """Tokenize SFT demonstrations; a prompt or example longer than ``max_len`` is a DataError naming the record."""
    out = []
    for d in demos:
        p = encode_prompt(tokenizer, d.prompt)
        r = encode_response(tokenizer, d.response)
        if len(p) >= max_len:
            raise DataError(f"{d.where}: prompt is {len(p)} tokens, longer than the model's context ({max_len})")
        if len(p) + len(r) > max_len:
            raise DataError(
                f"{d.where}: prompt + response is {len(p) + len(r)} tokens, longer than max_len ({max_len})"
            )
        out.append(TokenizedExample(p + r, [IGNORE] * len(p) + r))
    return out


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
