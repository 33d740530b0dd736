"""Preference pairs as tokens: one comparison (prompt, chosen, rejected) tokenized, and a batch of them
collated for each forward layout of ``rlhfkit.models.sequence_logps`` (DPO, DNO).

Prompt and responses are tokenized apart with the project's one prompt rendering (``data.collate``),
responses ending with EOS, so the prompt/response boundary is exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from rlhfkit.data.collate import Truncation, encode_prompt, encode_response, fit_to_length, pad_batch


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one comparison; response ids end with EOS."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    weight: float = 1.0


def tokenize_pairs(tokenizer, pairs: Sequence, max_len: int, truncation: Truncation = Truncation.error,
                   counts: dict | None = None) -> list[TokenizedPair]:
    """``pairs`` have .prompt/.chosen/.rejected (and optionally .weight/.where); too long is a DataError under
    ``truncation: error``, else cut (``counts["truncated"]`` counts those pairs)."""
    out, n_cut = [], 0
    for i, pair in enumerate(pairs):
        where = getattr(pair, "where", "") or f"pair {i}"
        p, (c, r), cut = fit_to_length(encode_prompt(tokenizer, pair.prompt),
                                       [encode_response(tokenizer, pair.chosen), encode_response(tokenizer, pair.rejected)],
                                       max_len, Truncation(truncation), where)
        n_cut += cut
        out.append(TokenizedPair(p, c, r, float(getattr(pair, "weight", 1.0))))
    if counts is not None:
        counts["truncated"] = counts.get("truncated", 0) + n_cut
    return out


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded to one length: (2B, T) ids, mask, response mask.

    One (2B, T) batch means one forward pass for both sides: half the kernel launches and
    Python overhead of two passes, which dominate on small models.
    """
    seqs, resp = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            r = getattr(p, side)
            seqs.append(p.prompt_ids + r)
            resp.append([0] * len(p.prompt_ids) + [1] * len(r))
    return {
        "input_ids": pad_batch(seqs, pad_id),
        "attention_mask": pad_batch([[1] * len(s) for s in seqs], 0),
        "response_mask": pad_batch(resp, 0),
    }


def collate_pairs_shared_prompt(pairs: Sequence[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompts once, LEFT-padded (B, P); responses interleaved chosen₀, rejected₀, chosen₁, … RIGHT-padded (2B, R).

    Left padding makes every prompt end at the last column, so each response continues from
    the same cache position; ``response_mask`` (2B, R) marks real response tokens (EOS included).
    """
    responses = [r for p in pairs for r in (p.chosen_ids, p.rejected_ids)]
    return {
        "prompt_ids": pad_batch([p.prompt_ids for p in pairs], pad_id, side="left"),
        "prompt_mask": pad_batch([[1] * len(p.prompt_ids) for p in pairs], 0, side="left"),
        "response_ids": pad_batch(responses, pad_id),
        "response_mask": pad_batch([[1] * len(r) for r in responses], 0),
    }


def collate_pairs_packed(pairs: Sequence[TokenizedPair]) -> dict[str, torch.Tensor]:
    """Every pair in ONE unpadded row ``[prompt₀ chosen₀ rejected₀ prompt₁ …]`` of N tokens, for view attention.

    - ``input_ids``, ``position_ids`` (1, N): both responses' positions continue from their prompt's
      end (rejected's restart where chosen's did), the positions of the concatenated forward;
    - ``view_index`` (2B, L): the row positions of view i = (prompt i, chosen i) and of view B + i =
      (prompt i, rejected i), right-padded with the view's first position (never attended: causal);
    - ``view_source`` (N,): where each token reads its attention output, flat (view · L + column): a
      prompt or chosen token from its chosen view, a rejected token from its rejected view;
    - ``predictor`` (1, M), ``labels`` (M,), ``label_view`` (M,), for each of the M response tokens: the
      row position whose logits predict it, the token, and its view (= its output row). Rejected's first
      token is predicted by the prompt's last position, not by chosen's last token, which precedes it in the row.
    """
    b = len(pairs)
    length = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    ids, positions, views, source = [], [], [None] * (2 * b), []
    predictor, labels, label_view = [], [], []
    start = 0
    for i, p in enumerate(pairs):
        n_p, n_c, n_r = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        ids += p.prompt_ids + p.chosen_ids + p.rejected_ids
        positions += list(range(n_p + n_c)) + list(range(n_p, n_p + n_r))
        prompt, chosen = list(range(start, start + n_p)), list(range(start + n_p, start + n_p + n_c))
        rejected = list(range(start + n_p + n_c, start + n_p + n_c + n_r))
        for v, view in ((i, prompt + chosen), (b + i, prompt + rejected)):
            views[v] = view + [start] * (length - len(view))
        source += [i * length + j for j in range(n_p + n_c)] + [(b + i) * length + n_p + j for j in range(n_r)]
        predictor += [prompt[-1]] + chosen[:-1] + [prompt[-1]] + rejected[:-1]
        labels += p.chosen_ids + p.rejected_ids
        label_view += [i] * n_c + [b + i] * n_r
        start += n_p + n_c + n_r

    def t(x):
        return torch.tensor(x, dtype=torch.long)

    return {"input_ids": t([ids]), "position_ids": t([positions]), "view_index": t(views), "view_source": t(source),
            "predictor": t([predictor]), "labels": t(labels), "label_view": t(label_view)}
