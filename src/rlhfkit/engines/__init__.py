"""Rollout engines: what generates tokens behind ``generation.sample``.

``generation.sample`` is the one sampling function. It encodes the prompts, splits them into chunks
of ``SamplingConfig.batch_size``, draws one seed per chunk, cuts each response after its first EOS
and builds the :class:`~rlhfkit.generation.Sample` records; an engine only turns a chunk of prompt
token ids into generated token ids and, when asked, the sampler's log-probs of those tokens:

- ``hf`` (:class:`rlhfkit.engines.hf.HFEngine`, the default and the CPU path): ``transformers``
  ``generate`` on the training model itself, so it always samples the current weights;
- ``vllm`` (:class:`rlhfkit.engines.vllm.VLLMEngine`, GPUs only, the ``gpu`` extra): a vLLM engine
  colocated in the training process, holding its own copy of the weights. The recipe calls
  ``sleep()`` before an update (vLLM frees its GPU memory while the policy trains) and
  ``sync_weights(policy)`` after it (the new weights, a LoRA adapter merged, are loaded into vLLM).

Token ids in, token ids out: the ids trained on are the ids generated, never a decode and re-encode.
The sampler's log-probs are diagnostics; the loss's come from the training forward
(``generation.token_logprobs``), and the RL recipe logs the difference every step.

A recipe that samples more than once builds its engine once with :func:`make_engine` and passes it
to ``sample`` in place of the model; ``sample`` given a model builds the engine ``SamplingConfig.engine``
names for that one call. :func:`check_engine` fails a stage before any expensive work when the engine
cannot run here (the pipeline calls it for every stage it is about to run).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Iterator, NamedTuple, Protocol, Sequence

from rlhfkit.config import ConfigError, check_positive

if TYPE_CHECKING:  # generation imports this package; the type is only named here
    from rlhfkit.generation import SamplingConfig

GPU_INSTALL = "pip install -e '.[gpu]' (or: pip install -r requirements-gpu.lock && pip install --no-deps -e .)"


class Engine(StrEnum):
    """What generates rollouts."""

    hf = "hf"
    """``transformers`` ``generate`` on the training model (any device; the default)"""
    vllm = "vllm"
    """vLLM colocated in the training process (one CUDA GPU, the ``gpu`` extra); weights synced after each update"""


@dataclass(frozen=True)
class VLLMConfig:
    """The vLLM engine's settings (used only with ``engine: vllm``)."""

    gpu_memory_utilization: float = 0.3
    """share of the GPU's memory vLLM takes for its weights and KV cache; the rest stays with training
    (TRL's colocate default is 0.3)"""
    sleep: bool = True
    """free vLLM's GPU memory (weights and KV cache, sleep level 2) while the policy trains; it wakes and is
    given the new weights before the next rollout"""
    dtype: str = "bfloat16"
    """vLLM's weights and activations: bfloat16 (the training forward's autocast on a GPU), float16 or float32"""
    max_model_len: int = 0
    """longest prompt + response vLLM holds; 0: the model's max_position_embeddings"""
    enforce_eager: bool = False
    """no CUDA graphs: faster start and less memory, slower decoding"""

    def __post_init__(self):
        check_positive(gpu_memory_utilization=self.gpu_memory_utilization)
        if self.gpu_memory_utilization >= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1), got {self.gpu_memory_utilization}")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")
        if self.max_model_len < 0:
            raise ValueError(f"max_model_len must be >= 0 (0: the model's), got {self.max_model_len}")


class Generated(NamedTuple):
    """One generated sequence as an engine returns it (``sample`` cuts it after the first EOS)."""

    token_ids: list[int]
    """the new tokens; anything after the first EOS (padding, with hf) is ignored"""
    logprobs: list[float] | None
    """the sampler's log-prob of each new token (None unless asked for)"""


class RolloutEngine(Protocol):
    """What ``generation.sample`` needs from an engine."""

    def generate(self, prompt_ids: Sequence[list[int]], cfg: "SamplingConfig", n: int, seed: int,
                 return_logprobs: bool) -> list[Generated]:
        """``n`` sequences per prompt, prompt-major: ``cfg``'s max_new_tokens, temperature (0: greedy) and
        top_p, drawn from ``seed`` (the chunk's); with ``return_logprobs`` the sampler's log-probs of the
        drawn tokens at the sampling temperature (1 when greedy)."""

    def sync_weights(self, model) -> None:
        """Sample from ``model``'s current weights from now on (after an update); wakes a sleeping engine."""

    def sleep(self) -> None:
        """Free the engine's accelerator memory until the next ``sync_weights`` (the policy trains meanwhile)."""

    def close(self) -> None:
        """Release everything the engine holds."""


def check_engine(sampling: "SamplingConfig", key: str) -> None:
    """A :class:`ConfigError` naming ``key`` (the field, e.g. ``ppo.sampling.engine``) when ``sampling.engine``
    cannot run in this environment: vllm needs the ``vllm`` package (the ``gpu`` extra), a CUDA GPU and one process.
    Cheap (no import of vllm), so a stage fails with it before loading anything."""
    if Engine(sampling.engine) is not Engine.vllm:
        return
    import torch

    missing = []
    if importlib.util.find_spec("vllm") is None:
        missing.append(f"the vllm package, which is not installed here: {GPU_INSTALL}")
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU, and none is visible here")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        missing.append("one process, and this is one of several (accelerate launch, torchrun)")
    if missing:
        raise ConfigError(f"{key}: vllm needs " + "; and ".join(missing) + f" (or set {key}=hf, the CPU path)")


def sampling_configs(section, prefix: str) -> Iterator[tuple[str, "SamplingConfig"]]:
    """(dotted key, config) of every sampling config inside a stage's config ``section`` (nested sections too)."""
    if not dataclasses.is_dataclass(section):
        return
    if isinstance(getattr(section, "engine", None), Engine):
        yield prefix, section
        return
    for f in dataclasses.fields(section):
        yield from sampling_configs(getattr(section, f.name), f"{prefix}.{f.name}")


def check_stage_engines(section, name: str) -> None:
    """:func:`check_engine` for every sampling config of stage ``name``'s config ``section``."""
    for key, sampling in sampling_configs(section, name):
        check_engine(sampling, f"{key}.engine")


def make_engine(sampling: "SamplingConfig", model, tokenizer, device=None) -> RolloutEngine:
    """The engine ``sampling.engine`` names, serving ``model`` (a LoRA policy's adapter merged, for vllm)."""
    if Engine(sampling.engine) is Engine.hf:
        from rlhfkit.engines.hf import HFEngine

        return HFEngine(model, tokenizer, device)
    check_engine(sampling, "sampling.engine")
    from rlhfkit.engines.vllm import VLLMEngine

    return VLLMEngine(model, tokenizer, sampling.vllm)
