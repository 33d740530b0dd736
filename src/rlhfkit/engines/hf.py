"""The ``hf`` rollout engine: ``transformers`` ``generate`` on the training model itself.

KV cache, batched, left padding so every prompt ends at the same column. It samples the model's
current weights, so ``sync_weights`` only points it at the model it is given and ``sleep`` does
nothing. Each chunk's draws come from the global torch RNG seeded with the chunk's seed, as
``generate`` reads it.
"""
from __future__ import annotations

from typing import Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from rlhfkit.data.collate import pad_batch
from rlhfkit.engines import Generated


def unwrap(model):
    """The module inside a DDP (or similar) wrapper; the model itself otherwise."""
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


class HFEngine:
    """``generate`` on ``model`` (unwrapped from DDP), its inputs on ``device`` (default: the model's)."""

    def __init__(self, model, tokenizer, device: torch.device | None = None):
        self.model = unwrap(model)
        self.device = device
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[list[int]], cfg, n: int, seed: int,
                 return_logprobs: bool) -> list[Generated]:
        model = self.model
        was_training = model.training
        model.eval()
        device = self.device or next(model.parameters()).device
        ids = pad_batch(list(prompt_ids), self.pad, side="left").to(device)
        mask = pad_batch([[1] * len(c) for c in prompt_ids], 0, side="left").to(device)
        # generate() draws from the global RNG: the chunk's seed makes it reproducible.
        torch.manual_seed(seed)
        greedy = cfg.temperature <= 0
        gen_kwargs = dict(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=cfg.max_new_tokens,
            do_sample=not greedy,
            num_return_sequences=n,
            pad_token_id=self.pad,
            eos_token_id=self.eos,
        )
        if not greedy:
            gen_kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
        recorder = None
        if return_logprobs:
            recorder = _sampled_logprobs_processor(cfg.temperature if not greedy else 1.0)
            gen_kwargs["logits_processor"] = LogitsProcessorList([recorder])
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            seqs = model.generate(**gen_kwargs)
        new = seqs[:, ids.shape[1]:].tolist()
        new_logprobs = recorder.finish(seqs).tolist() if recorder is not None else [None] * len(new)
        if was_training:
            model.train()
        return [Generated(row, lp) for row, lp in zip(new, new_logprobs)]

    def sync_weights(self, model) -> None:
        self.model = unwrap(model)  # generate reads the live weights: nothing to copy

    def sleep(self) -> None:
        pass

    def close(self) -> None:
        pass
