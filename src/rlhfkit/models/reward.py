"""Scalar-head models on any backbone: reward (Bradley-Terry), outcome (ORM), process (PRM) and cost.

One network for all four: a ``transformers`` backbone (``AutoModel``: a causal LM such as Llama,
or an encoder such as BERT/MiniLM) and a linear head giving one value per token.

- **reward / orm / cost** read the value at the LAST REAL TOKEN of each sequence, found from the
  attention mask (``T − 1 − argmax(flip(mask))``), never from "the first pad token": that is
  wrong under left padding and when pad == eos (the classic reward-at-wrong-token bug).
  Position ids are computed from the mask too, so left and right padding give the same score.
- **prm** reads, for a causal backbone, the value at the separator token (newline) that closes
  each step, in one forward pass: a causal model at that position has seen exactly the steps so
  far. An encoder attends both ways, so it would see later steps; for an encoder the PRM scores
  each prefix (prompt, steps 1..k) separately, at its last real token.

On disk (a normal Hugging Face directory plus two small files)::

    DIR/config.json, model.safetensors, tokenizer files   the backbone (AutoModel.from_pretrained)
    DIR/scalar_head.safetensors                          head weight (1, H) and bias (1,)
    DIR/scalar_head.json                                 {"kind", "pooling", "causal", "max_len", "separator",
                                                          "step_likelihood"}
    DIR/reference_lm/                                    a PRM with ``step_likelihood``: the frozen reference LM

An ensemble directory holds ``ensemble.json`` (``{"members": [...], "reduce", "k"}``) and member
directories; ``models.reward_files.load_reward_model`` loads either (``build_scalar_model``, saving and
loading are there) as a ``models.reward_scorers.RewardModel`` or ``RewardEnsemble``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from rlhfkit.data.collate import encode_prompt, encode_response, pad_batch
from rlhfkit.data.steps import STEP_SEPARATOR, join_steps
from rlhfkit.models.precision import fp32_head
from rlhfkit.models.view_attention import view_attention

KINDS = ("reward", "orm", "prm", "cost")
HEAD_JSON, HEAD_WEIGHTS, REFERENCE_LM = "scalar_head.json", "scalar_head.safetensors", "reference_lm"


@dataclass(frozen=True)
class HeadInfo:
    """What a saved scalar model is and how it reads its input."""

    kind: str = "reward"
    """reward (higher is better), orm (log-odds the final answer is right), prm (log-odds per step), cost (> 0 unsafe)"""
    pooling: str = "last"
    """last: the value at the last real token; mean: the mean over real tokens; response: the mean over
    segment B, the response (encoders: ``[CLS] prompt [SEP] response [SEP]``, token type 1)"""
    causal: bool = True
    """backbone attends only backwards (decides how the PRM reads steps)"""
    max_len: int = 256
    """longest input in tokens; longer inputs lose their beginning (the score is read at the end)"""
    separator: str = STEP_SEPARATOR
    """what closes each step in a PRM's input, the step's label read at its last token (a step is a line)"""
    step_likelihood: bool = False
    """a PRM on a causal backbone whose step logit also sees the step's log-likelihood under a frozen
    reference LM (``models.step_likelihood.StepLikelihood``)"""


def is_encoder(config) -> bool:
    """True for BERT-style bidirectional encoders (those with a masked-LM head class)."""
    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask → (B,) index of each row's last real token, for any padding side."""
    t = attention_mask.shape[1]
    return t - 1 - attention_mask.flip(-1).long().argmax(-1)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids 0, 1, … over real tokens only, so a left-padded row sees the same positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class ScalarModel(nn.Module):
    """backbone + Linear(H, 1): ``token_values`` (B, T) and ``forward`` → (B,) pooled values."""

    def __init__(self, backbone, info: HeadInfo):
        super().__init__()
        self.backbone = backbone
        # An encoder's pooler (BERT's, say) never reaches the score, which reads last_hidden_state:
        # frozen, it is not a parameter left without a gradient, which DDP refuses.
        if isinstance(getattr(backbone, "pooler", None), nn.Module):
            backbone.pooler.requires_grad_(False)
        self.info = info
        self.head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(backbone.config.hidden_size + 1))
        nn.init.zeros_(self.head.bias)
        self.likelihood = None  # a PRM's models.step_likelihood.StepLikelihood, when built with step_likelihood
        # ODIN's length head r_L (recipes.reward, length_decorrelation > 0): a Linear(H, 1) on the same features,
        # set only while training and never saved (save_scalar_model writes ``head``), so r_Q alone is the reward.
        self.length_head = None

    @property
    def _no_split_modules(self):
        """The backbone's layer classes (transformers' ``_no_split_modules``), which FSDP's transformer-based auto
        wrap reads from the model it prepares: each decoder layer then becomes a unit of its own."""
        return getattr(self.backbone, "_no_split_modules", None)

    def token_values(self, input_ids, attention_mask=None, token_type_ids=None, length_head: bool = False,
                     position_ids=None, token_views=None):
        """(B, T) values of ``head``; with ``length_head`` also those of ``length_head``, as a pair.

        With ``token_views = (view_index, view_source)`` the input is one packed row (1, N) with its
        ``position_ids`` (``data.collate.collate_shared_prefixes``), no attention mask, and the backbone
        attends by views (``models.view_attention``); the values are then (1, N).
        """
        if token_views is not None:
            with view_attention(self.backbone):
                hidden = self.backbone(input_ids=input_ids, position_ids=position_ids, token_views=token_views,
                                       use_cache=False).last_hidden_state  # (1, N, H)
        else:
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask,
                      "position_ids": positions_from_mask(attention_mask)}
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
            if self.info.causal:  # a decoder would build a KV cache nobody reads; an encoder may not take the flag
                kwargs["use_cache"] = False
            hidden = self.backbone(**kwargs).last_hidden_state  # (B, T, H)
        values = fp32_head(self.head, hidden).squeeze(-1)  # (B, T), fp32 whatever the backbone's dtype or autocast
        if length_head:
            return values, fp32_head(self.length_head, hidden).squeeze(-1)
        return values

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, step_spans=None, length_head: bool = False,
                position_ids=None, token_views=None, view_mask=None):
        """(B,) pooled values; with ``step_spans`` (a causal PRM: per row the (first, last) token index of
        each step, its separator included, as ``encode_step_spans`` gives) one (S_i,) tensor of step
        logits per row: the value at each step's last token, plus the ``likelihood`` term; with
        ``length_head`` (B, 2): the pooled values of ``head`` (r_Q) and ``length_head`` (r_L).

        Packed (a causal backbone that ``supports_view_attention``): ``input_ids`` and ``position_ids``
        (1, N), ``token_views = (view_index (V, L), view_source (N,))`` and ``view_mask`` (V, L), as
        ``data.collate.collate_shared_prefixes`` gives them, and no ``attention_mask``: (V,) values (or
        (V, 2)), one per view, pooled over the view's tokens gathered into a right-padded (V, L) batch
        exactly as over a padded row (``info.pooling`` last or mean).

        Training reaches the model through this method only: DDP and FSDP synchronise gradients
        through the wrapped module's forward, never through a submodule or another method.
        """
        if token_views is not None:
            if attention_mask is not None or step_spans is not None or view_mask is None:
                raise ValueError("a packed forward takes position_ids, token_views and view_mask, "
                                 "no attention_mask nor step_spans")
            index = token_views[0]
            out = self.token_values(input_ids, None, None, length_head, position_ids, token_views)
            if length_head:  # each head's (1, N) row values gathered by view → (V, L), pooled as padded rows
                return torch.stack([self._pool(v[0][index], view_mask, None) for v in out], dim=1)  # (V, 2)
            return self._pool(out[0][index], view_mask, None)  # (V,)
        if length_head:
            quality, length = self.token_values(input_ids, attention_mask, token_type_ids, length_head=True)
            return torch.stack([self._pool(quality, attention_mask, token_type_ids),
                                self._pool(length, attention_mask, token_type_ids)], dim=1)
        values = self.token_values(input_ids, attention_mask, token_type_ids)  # (B, T)
        if step_spans is not None:
            return self._step_values(values, input_ids, attention_mask, step_spans)
        return self._pool(values, attention_mask, token_type_ids)

    def _pool(self, values, attention_mask, token_type_ids):
        """(B, T) token values → (B,) by ``info.pooling``."""
        if self.info.pooling in ("mean", "response"):
            m = attention_mask.to(values.dtype)
            if self.info.pooling == "response":  # an encoder's segment B: the response (a PRM: the steps so far)
                if token_type_ids is None:
                    raise ValueError("pooling 'response' needs token_type_ids (an encoder backbone)")
                m = m * token_type_ids.to(values.dtype)
            return (values * m).sum(-1) / m.sum(-1).clamp(min=1)
        return values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)  # (B,)

    def _step_values(self, values, input_ids, attention_mask, step_spans) -> list[torch.Tensor]:
        if not self.info.causal:
            raise ValueError("step_spans are for a causal PRM; an encoder PRM scores each prefix as a sequence")
        feats = None
        if self.likelihood is not None:
            feats = self.likelihood.step_features(input_ids, attention_mask, step_spans)
        out = []
        for row, spans in enumerate(step_spans):
            pos = [last for _, last in spans]
            v = values[row, pos] if pos else values.new_zeros(0)
            if feats is not None and pos:
                v = v + self.likelihood(feats[row])
            out.append(v)
        return out


# ------------------------------------------------------------------------------ encoding

def encode(tokenizer, info: HeadInfo, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(input_ids, token_type_ids) of one (prompt, response), truncated to ``max_len``.

    Causal: the project's one prompt rendering (``encode_prompt``) + response + EOS, so the score
    is read at EOS; a long input loses its beginning. Encoder: ``[CLS] prompt [SEP] response [SEP]``
    with segment ids 0/1; the prompt keeps its latest tokens.
    """
    if info.causal:
        ids = encode_prompt(tokenizer, prompt) + encode_response(tokenizer, response)
        ids = ids[-info.max_len:]
        return ids, [0] * len(ids)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    budget = info.max_len - 3
    keep = max(budget // 2, budget - len(p))
    # A PRM prefix keeps its end (the step being rated); a reply keeps its start (where "Sure" or "I can't" is).
    r = r[-keep:] if info.kind == "prm" else r[:keep]
    p = p[-(budget - len(r)):] if budget > len(r) else []  # keep the latest turns of the prompt
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    return [cls, *p, sep, *r, sep], [0] * (len(p) + 2) + [1] * (len(r) + 1)


def encode_steps(tokenizer, info: HeadInfo, prompt: str, steps: Sequence[str]) -> tuple[list[int], list[int]]:
    """Causal PRM input: prompt, then each step followed by the separator; returns (ids, positions).

    ``positions[k]`` is the index of the separator's last token after step k: where the label of
    step k is read (the model there has seen steps 1..k and nothing after).
    """
    ids, spans = encode_step_spans(tokenizer, info, prompt, steps)
    return ids, [last for _, last in spans]


def separator_tokens(tokenizer, separator: str) -> int:
    """How many tokens the step separator encodes to (those that close each step in a PRM's input)."""
    return len(tokenizer(separator, add_special_tokens=False)["input_ids"])


def encode_step_spans(tokenizer, info: HeadInfo, prompt: str, steps: Sequence[str]) -> tuple[list[int], list[tuple[int, int]]]:
    """As :func:`encode_steps`, with the (first, last) token index of each step, its separator included."""
    sep = tokenizer(info.separator, add_special_tokens=False)["input_ids"]
    ids, spans = encode_prompt(tokenizer, prompt), []
    for s in steps:
        first = len(ids)
        ids = ids + tokenizer(s, add_special_tokens=False)["input_ids"] + sep
        spans.append((first, len(ids) - 1))
    cut = max(0, len(ids) - info.max_len)
    if cut > (spans[0][1] if spans else 0):
        raise ValueError(f"a solution of {len(ids)} tokens does not fit max_len={info.max_len} with its first step")
    return ids[cut:], [(max(first - cut, 0), last - cut) for first, last in spans]


def collate(seqs: Sequence[Sequence[int]], types: Sequence[Sequence[int]] | None, pad_id: int,
            side: str = "right") -> dict[str, torch.Tensor]:
    batch = {"input_ids": pad_batch(seqs, pad_id, side),
             "attention_mask": pad_batch([[1] * len(s) for s in seqs], 0, side)}
    if types is not None:
        batch["token_type_ids"] = pad_batch(types, 0, side)
    return batch


# ------------------------------------------------------------------------------ step logits

def step_logits(net: ScalarModel, tokenizer, prompts, steps, batch_size: int, device, grad: bool = False,
                needed: Sequence[Sequence[bool]] | None = None, module=None):
    """Per-step logits, one list (or tensor when ``grad``) per solution.

    Causal backbone: one forward per solution, values read at the separators. Encoder: one
    forward per prefix; ``needed[i][k]`` False skips prefix k of solution i (its value is 0), so
    data with one rated step a row (PRM800K) costs one forward per row, not one per step.
    ``module``: what is called for the forward while training, ``net`` wrapped by DDP/FSDP
    (``accelerator.prepare``); ``net`` itself by default.
    """
    if grad:
        return _step_logit_tensors(net, tokenizer, prompts, steps, batch_size, device, needed, module)
    with torch.no_grad():  # values only: no autograd graph (a whole test split would otherwise be held in memory)
        return [row.tolist() for row in _step_logit_tensors(net, tokenizer, prompts, steps, batch_size, device, needed, module)]


def causal_step_batches(tokenizer, info: HeadInfo, prompts, steps, batch_size: int, device):
    """Yield (collated batch on ``device``, per row the step spans of :func:`encode_step_spans`)."""
    for s in range(0, len(prompts), batch_size):
        enc = [encode_step_spans(tokenizer, info, p, st) for p, st in zip(prompts[s:s + batch_size], steps[s:s + batch_size])]
        batch = collate([e[0] for e in enc], None, tokenizer.pad_token_id)
        yield {k: v.to(device) for k, v in batch.items()}, [e[1] for e in enc]


def _step_logit_tensors(net: ScalarModel, tokenizer, prompts, steps, batch_size: int, device,
                        needed: Sequence[Sequence[bool]] | None, module=None) -> list[torch.Tensor]:
    """``step_logits``'s work: one (S_i,) tensor per solution, under whatever grad mode the caller set."""
    info, out, call = net.info, [], net if module is None else module
    if info.causal:
        for b, spans_batch in causal_step_batches(tokenizer, info, prompts, steps, batch_size, device):
            out.extend(call(**b, step_spans=spans_batch))
        return out
    flat = [(i, k, p, join_steps(st[:k + 1])) for i, (p, st) in enumerate(zip(prompts, steps))
            for k in range(len(st)) if needed is None or needed[i][k]]
    vals: list = []
    for s in range(0, len(flat), batch_size):
        enc = [encode(tokenizer, info, p, r) for _, _, p, r in flat[s:s + batch_size]]
        b = collate([e[0] for e in enc], [e[1] for e in enc], tokenizer.pad_token_id)
        vals.append(call(**{k: v.to(device) for k, v in b.items()}))
    allv = torch.cat(vals) if vals else torch.zeros(0, device=device)
    rows = [[None] * len(st) for st in steps]
    for j, (i, k, _, _) in enumerate(flat):
        rows[i][k] = j
    for row in rows:
        idx = torch.tensor([j if j is not None else 0 for j in row], dtype=torch.long, device=allv.device)
        keep = torch.tensor([j is not None for j in row], device=allv.device)
        if allv.numel() == 0:
            v = torch.zeros(len(row), device=allv.device)
        else:
            v = torch.where(keep, allv[idx], torch.zeros((), device=allv.device))
        out.append(v)
    return out
