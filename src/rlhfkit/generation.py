"""Sampling responses from a policy, and the log-probabilities of given responses.

Sampling goes through ``transformers`` ``generate`` (KV cache, batched, left padding so every
prompt ends at the same column). A response is cut after its first EOS; one that hits
``max_new_tokens`` without EOS is marked ``finished=False`` so callers can penalise it rather than
score it as if complete. Log-probabilities used by a loss are always recomputed by a training
forward pass (:func:`token_logprobs`), with the sampling temperature; the ones from generation
(``sample(return_logprobs=True)``) are never used for gradients, only to measure how far the
sampler's distribution is from the training forward's (and, optionally, to correct for it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from rlhfkit.config import check_non_negative, check_positive
from rlhfkit.data.collate import encode_prompt, encode_response, pad_batch
from rlhfkit.models.token_logps import per_row, scored_logprobs, scored_logprobs_and_entropy
from rlhfkit.models.trainable import reference_mode


@dataclass(frozen=True)
class Sample:
    """One sampled response."""

    prompt: str
    prompt_ids: list[int]
    response_ids: list[int]  # without EOS
    text: str
    finished: bool  # ended with EOS within max_new_tokens
    # The sampler's log π(token) of each response token (EOS included when finished), at the sampling
    # temperature; only with sample(return_logprobs=True). A diagnostic, never a loss input.
    logprobs: tuple[float, ...] | None = None


@dataclass(frozen=True)
class SamplingConfig:
    """How responses are sampled."""

    max_new_tokens: int = 64
    """longest response; one that reaches it without EOS is unfinished"""
    temperature: float = 1.0
    """softmax temperature; 0 means greedy decoding"""
    top_p: float = 1.0
    """nucleus sampling mass"""
    batch_size: int = 64
    """prompts per generate call"""

    def __post_init__(self):
        check_non_negative(temperature=self.temperature)
        check_positive(top_p=self.top_p, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        if self.top_p > 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def _sampled_logprobs_processor(temperature: float):
    """A logits processor that records log softmax(logits / T) at each token ``generate`` samples.

    ``generate`` runs the processors it is given before its own temperature and top-p warpers
    (transformers' ``_get_logits_processor``), so the scores seen here are the model's logits, and
    only one step's (B, V) log-probs is held at a time: ``output_logits=True`` would keep every
    step's (B, V) logits until generation ends. The token drawn at step t is the last column of
    the ids at step t + 1's call; ``finish`` reads the last one from the returned sequences. If a
    transformers release ran these processors after its warpers, the sampler's log-probs would be
    divided by T twice: ``test_pitfalls.py`` compares them with the training forward at T ≠ 1.
    """
    class SampledLogprobs(LogitsProcessor):
        def __init__(self):
            self.pending: torch.Tensor | None = None  # (B, V) log-probs of the step whose token is not yet known
            self.steps: list[torch.Tensor] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if self.pending is not None:
                self.steps.append(self.pending.gather(-1, input_ids[:, -1:]).squeeze(-1))
            self.pending = torch.log_softmax(scores.float() / temperature, dim=-1)
            return scores

        def finish(self, sequences: torch.Tensor) -> torch.Tensor:
            """(B, new tokens) log-probs of the sampled tokens."""
            if self.pending is not None:
                self.steps.append(self.pending.gather(-1, sequences[:, -1:]).squeeze(-1))
                self.pending = None
            if not self.steps:
                return torch.zeros(sequences.shape[0], 0)
            return torch.stack(self.steps, dim=1)

    return SampledLogprobs()


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: Sequence[str],
    cfg: SamplingConfig,
    seed: int = 0,
    num_return_sequences: int = 1,
    device: torch.device | None = None,
    response_prefixes: Sequence[str] | None = None,
    first_chunk: int = 0,
    return_logprobs: bool = False,
) -> list[Sample]:
    """Sample ``num_return_sequences`` responses per prompt (prompt-major order).

    ``response_prefixes`` (one per prompt): a start of the response to continue, placed after
    the prompt's own text (after a chat template's assistant turn, not inside the user turn)
    and tokenized on its own as a response is; ``prompt_ids`` then end with the prefix's ids and
    ``text`` is only the continuation.

    Each generate call (``cfg.batch_size`` prompts) is seeded by the next draw of a generator
    seeded with ``seed``. ``first_chunk`` skips that many draws: a process sampling a shard that
    starts at prompt ``first_chunk · cfg.batch_size`` of a batch draws what one process would.

    ``return_logprobs``: each Sample also carries the sampler's log-probs of its tokens, from
    the logits ``generate`` drew them from, divided by the temperature (1 when greedy) and before
    top-p (with top_p < 1 the draw is from that distribution renormalised over the nucleus); the
    samples drawn are the same either way.
    """
    model = unwrap(model)
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for _ in range(first_chunk):
        torch.randint(0, 2**31 - 1, (1,), generator=gen)
    out: list[Sample] = []
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    if response_prefixes is not None:
        if len(response_prefixes) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(response_prefixes)} response prefixes")
        encoded = [ids + encode_response(tokenizer, r, add_eos=False) for ids, r in zip(encoded, response_prefixes)]

    starts = range(0, len(prompts), cfg.batch_size)
    for start in tqdm(starts, desc="sampling", disable=len(starts) < 2, leave=False):
        chunk = encoded[start:start + cfg.batch_size]
        ids = pad_batch(chunk, pad, side="left").to(device)
        mask = pad_batch([[1] * len(c) for c in chunk], 0, side="left").to(device)
        # generate() draws from the global RNG; seed it per chunk from our generator for reproducibility.
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        greedy = cfg.temperature <= 0
        gen_kwargs = dict(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=cfg.max_new_tokens,
            do_sample=not greedy,
            num_return_sequences=num_return_sequences,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        if not greedy:
            gen_kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
        recorder = None
        if return_logprobs:
            recorder = _sampled_logprobs_processor(cfg.temperature if not greedy else 1.0)
            gen_kwargs["logits_processor"] = LogitsProcessorList([recorder])
        seqs = model.generate(**gen_kwargs)
        new = seqs[:, ids.shape[1]:].tolist()
        new_logprobs = recorder.finish(seqs).tolist() if recorder is not None else None
        for j, row in enumerate(new):
            p_idx = start + j // num_return_sequences
            # EOS is looked for in the generated tokens only: a prompt (a chat template's end of
            # turn) may hold the EOS token and says nothing about whether the response ended.
            if eos in row:
                resp, finished = row[: row.index(eos)], True
            else:
                resp, finished = row, False
            out.append(Sample(
                prompt=prompts[p_idx],
                prompt_ids=encoded[p_idx],
                response_ids=resp,
                text=tokenizer.decode(resp, skip_special_tokens=True),
                finished=finished,
                logprobs=tuple(new_logprobs[j][:len(resp) + int(finished)]) if new_logprobs is not None else None,
            ))
    if was_training:
        model.train()
    return out


def sequences_from_samples(samples: Sequence[Sample], pad_id: int, eos_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response batch and the mask of response tokens (EOS included when finished).

    Returns input_ids, attention_mask (B, T) and response_mask (B, T): 1 at response positions.
    """
    seqs, resp_masks = [], []
    for s in samples:
        resp = s.response_ids + ([eos_id] if s.finished else [])
        seqs.append(s.prompt_ids + resp)
        resp_masks.append([0] * len(s.prompt_ids) + [1] * len(resp))
    return {
        "input_ids": pad_batch(seqs, pad_id),
        "attention_mask": pad_batch([[1] * len(x) for x in seqs], 0),
        "response_mask": pad_batch(resp_masks, 0),
    }


def sampler_logprobs(samples: Sequence[Sample], width: int) -> torch.Tensor:
    """The samples' own log-probs from the sampler, (B, width) in the layout of ``sequences_from_samples``
    (at response positions, EOS included when finished; 0 elsewhere)."""
    out = torch.zeros(len(samples), width)
    for b, s in enumerate(samples):
        if s.logprobs is None:
            raise ValueError("samples carry no log-probs: sample them with return_logprobs=True")
        start = len(s.prompt_ids)
        out[b, start:start + len(s.logprobs)] = torch.tensor(s.logprobs, dtype=torch.float32)
    return out


def _scored_mask(attention_mask: torch.Tensor, scored: torch.Tensor | None) -> torch.Tensor:
    """The tokens to score, (B, T) bool: ``scored``, or every real token after the first; never token 0."""
    mask = (attention_mask if scored is None else scored).bool().clone()
    mask[:, 0] = False
    return mask


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0,
                   scored: torch.Tensor | None = None) -> torch.Tensor:
    """log π(x_t | x_<t) at ``temperature`` from a forward pass: (B, T) → (B, T), 0 where not scored.

    Aligned with ``input_ids`` so ``response_mask`` applies directly. The one forward for log-probs
    of given tokens: PPO's loss, its reference and its held-out KL all read it, at the sampling
    temperature (log-probs at another temperature make the PPO ratio wrong from the first step).
    ``scored`` (B, T): the tokens whose log-probs are read (PPO: the response mask); the output head
    runs only at the positions predicting them (``models.token_logps``). None: every real token but
    the first. Token 0 is never scored (its value is 0). Gradients flow unless the caller is under
    ``torch.no_grad()``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (a greedy sampler's log-probs are taken at 1)")
    mask = _scored_mask(attention_mask, scored)
    return per_row(scored_logprobs(model, input_ids, mask, temperature, attention_mask=attention_mask), mask)


def token_logprobs_and_entropy(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                               temperature: float = 1.0, scored: torch.Tensor | None = None,
                               entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_logprobs` and the entropy of π(· | x_<t) at each scored position, from the same forward:
    (B, T) → (B, T), (B, T), 0 where not scored. The entropy has gradients only with ``entropy_grad``
    (PPO's entropy bonus, ``entropy_coef > 0``); otherwise it is a diagnostic, computed without autograd."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    mask = _scored_mask(attention_mask, scored)
    logp, entropy = scored_logprobs_and_entropy(model, input_ids, mask, temperature, entropy_grad,
                                                attention_mask=attention_mask)
    return per_row(logp, mask), per_row(entropy, mask)


@torch.no_grad()
def reference_token_logprobs(policy, reference, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                             temperature: float = 1.0, scored: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`token_logprobs` (B, T) under the frozen reference: ``reference`` itself (a separate copy), or,
    when it is None, ``policy`` with its LoRA adapter disabled (``models.trainable.reference_mode``)."""
    if reference is not None:
        return token_logprobs(reference, input_ids, attention_mask, temperature, scored)
    with reference_mode(policy) as base:
        return token_logprobs(base, input_ids, attention_mask, temperature, scored)
