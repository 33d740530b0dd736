"""Sampling responses from a policy, and the log-probabilities of given responses.

:func:`sample` is the one sampling function. It encodes the prompts, draws one seed per chunk of
``batch_size`` prompts, and hands each chunk's token ids to a rollout engine (``rlhfkit.engines``:
``hf``, ``transformers`` ``generate`` on the model, the default and the CPU path; ``vllm`` on a GPU).
A response is cut after its first EOS; one that hits ``max_new_tokens`` without EOS is marked
``finished=False`` so callers can penalise it rather than score it as if complete. Log-probabilities
used by a loss are always recomputed by a training forward pass (:func:`token_logprobs`), with the
sampling temperature; the ones from the engine (``sample(return_logprobs=True)``) are never used for
gradients, only to measure how far the sampler's distribution is from the training forward's (and,
optionally, to correct for it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from rlhfkit.config import check_non_negative, check_positive, coerce_enums
from rlhfkit.data.collate import encode_prompt, encode_response, pad_batch
from rlhfkit.engines import Engine, RolloutEngine, VLLMConfig, make_engine
from rlhfkit.engines.hf import unwrap  # noqa: F401  (the recipes import it from here)
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
    """prompts per engine call (each call draws its own seed); vllm schedules its own batches inside a call, so a
    larger value only helps it"""
    engine: Engine = Engine.hf
    """hf (``transformers`` generate on the training model: any device) or vllm (vLLM colocated on the GPU, the
    ``gpu`` extra: pip install -e '.[gpu]'; the policy's weights are synced into it after every update)"""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """the vLLM engine's settings (engine: vllm only)"""
    bf16: bool = False
    """hf engine: generate under bf16 autocast (the weights stay as they are): about twice fp32's tokens/s on a CPU
    with AVX512-BF16 or AMX (``bench/generation_bf16.py``) and on a GPU; the samples differ from fp32's by
    rounding. PPO's loss still takes its log-probs from the training forward. vllm sets its own ``vllm.dtype``"""

    def __post_init__(self):
        check_non_negative(temperature=self.temperature)
        check_positive(top_p=self.top_p, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        if self.top_p > 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        coerce_enums(self)


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

    ``model``: a rollout engine (``engines.make_engine``: what a recipe that samples more than once passes),
    or a model, sampled through the engine ``cfg.engine`` names, built for this call (``device``: where the
    hf engine puts its inputs; default the model's). Given an engine, ``cfg.engine`` is not read.

    ``response_prefixes`` (one per prompt): a start of the response to continue, placed after
    the prompt's own text (after a chat template's assistant turn, not inside the user turn)
    and tokenized on its own as a response is; ``prompt_ids`` then end with the prefix's ids and
    ``text`` is only the continuation.

    Each engine call (``cfg.batch_size`` prompts) is seeded by the next draw of a generator
    seeded with ``seed``. ``first_chunk`` skips that many draws: a process sampling a shard that
    starts at prompt ``first_chunk · cfg.batch_size`` of a batch draws what one process would.

    ``return_logprobs``: each Sample also carries the sampler's log-probs of its tokens, from
    the logits the tokens were drawn from, divided by the temperature (1 when greedy); the samples
    drawn are the same either way (top-p: see the engines).
    """
    own_engine = isinstance(model, torch.nn.Module)
    engine: RolloutEngine = make_engine(cfg, model, tokenizer, device) if own_engine else model
    eos = tokenizer.eos_token_id
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
    try:
        for start in tqdm(starts, desc="sampling", disable=len(starts) < 2, leave=False):
            chunk_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
            generated = engine.generate(encoded[start:start + cfg.batch_size], cfg, num_return_sequences, chunk_seed,
                                        return_logprobs)
            for j, (row, logprobs) in enumerate(generated):
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
                    logprobs=tuple(logprobs[:len(resp) + int(finished)]) if logprobs is not None else None,
                ))
    finally:
        if own_engine:
            engine.close()
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
