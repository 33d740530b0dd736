"""The rollout engine interface (issue 16): ``generation.sample`` behind ``sampling.engine``.

On a CPU: the hf engine gives exactly the samples the sampler gave before engines existed (its code is
kept below, verbatim, as ``legacy_sample``), whether ``sample`` gets the model or the engine; the RL
recipe puts its engine to sleep before each update and gives it the updated weights after; ``engine:
vllm`` where it cannot run fails when the stage (or the pipeline) starts, naming the field and the
fix; the merged weights a vLLM engine is given under LoRA are ``merge_and_unload``'s. The vLLM engine
itself is exercised only on a GPU (``test_gpu_engines.py``, ``scripts/gpu_check.sh``).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from rlhfkit.config import ConfigError, load_config
from rlhfkit.data.collate import encode_prompt, encode_response, pad_batch
from rlhfkit.engines import Engine, check_engine, make_engine
from rlhfkit.engines.hf import HFEngine
from rlhfkit.generation import Sample, SamplingConfig, sample

CPU = torch.device("cpu")


# ---------------------------------------------------------------- the sampler as it was (verbatim, less docstrings)

def _legacy_recorder(temperature: float):
    class SampledLogprobs(LogitsProcessor):
        def __init__(self):
            self.pending = None
            self.steps = []

        def __call__(self, input_ids, scores):
            if self.pending is not None:
                self.steps.append(self.pending.gather(-1, input_ids[:, -1:]).squeeze(-1))
            self.pending = torch.log_softmax(scores.float() / temperature, dim=-1)
            return scores

        def finish(self, sequences):
            if self.pending is not None:
                self.steps.append(self.pending.gather(-1, sequences[:, -1:]).squeeze(-1))
                self.pending = None
            if not self.steps:
                return torch.zeros(sequences.shape[0], 0)
            return torch.stack(self.steps, dim=1)

    return SampledLogprobs()


@torch.no_grad()
def legacy_sample(model, tokenizer, prompts, cfg, seed=0, num_return_sequences=1, device=None,
                  response_prefixes=None, first_chunk=0, return_logprobs=False):
    model = model.module if hasattr(model, "module") else model
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for _ in range(first_chunk):
        torch.randint(0, 2**31 - 1, (1,), generator=gen)
    out = []
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    if response_prefixes is not None:
        encoded = [ids + encode_response(tokenizer, r, add_eos=False) for ids, r in zip(encoded, response_prefixes)]
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = encoded[start:start + cfg.batch_size]
        ids = pad_batch(chunk, pad, side="left").to(device)
        mask = pad_batch([[1] * len(c) for c in chunk], 0, side="left").to(device)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        greedy = cfg.temperature <= 0
        gen_kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=cfg.max_new_tokens, do_sample=not greedy,
                          num_return_sequences=num_return_sequences, pad_token_id=pad, eos_token_id=eos)
        if not greedy:
            gen_kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
        recorder = None
        if return_logprobs:
            recorder = _legacy_recorder(cfg.temperature if not greedy else 1.0)
            gen_kwargs["logits_processor"] = LogitsProcessorList([recorder])
        seqs = model.generate(**gen_kwargs)
        new = seqs[:, ids.shape[1]:].tolist()
        new_logprobs = recorder.finish(seqs).tolist() if recorder is not None else None
        for j, row in enumerate(new):
            p_idx = start + j // num_return_sequences
            if eos in row:
                resp, finished = row[: row.index(eos)], True
            else:
                resp, finished = row, False
            out.append(Sample(prompt=prompts[p_idx], prompt_ids=encoded[p_idx], response_ids=resp,
                              text=tokenizer.decode(resp, skip_special_tokens=True), finished=finished,
                              logprobs=tuple(new_logprobs[j][:len(resp) + int(finished)]) if new_logprobs is not None else None))
    if was_training:
        model.train()
    return out


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def eos_lm(tmp_path_factory):
    """A 7-token tokenizer and a tiny Llama on it; EOS is one token in 7, so responses end, or not, often."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rlhfkit.models.loading import TinyModelConfig, build_tiny_causal_lm, save_pretrained_atomic

    vocab = {"<|pad|>": 0, "<|bos|>": 1, "<|eos|>": 2, "a": 3, "b": 4, "c": 5, "ab": 6}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")
    arch = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("eos") / "model"
    save_pretrained_atomic(build_tiny_causal_lm(arch, tok, seed=0), tok, path)
    return path


PROMPTS = ["abc", "ca", "bca", "c", "aab"]
CASES = {  # name: (SamplingConfig kwargs, sample kwargs)
    "greedy": (dict(max_new_tokens=6, temperature=0.0, batch_size=2), {}),
    "top_p, groups, log-probs": (dict(max_new_tokens=8, temperature=0.8, top_p=0.9, batch_size=2),
                                 dict(num_return_sequences=3, return_logprobs=True, seed=5)),
    "hot, prefixes": (dict(max_new_tokens=5, temperature=1.3, batch_size=3),
                      dict(num_return_sequences=2, response_prefixes=["a", "b", "", "ab", "c"], seed=2)),
    "a later shard": (dict(max_new_tokens=3, temperature=1.0, batch_size=2),
                      dict(first_chunk=2, return_logprobs=True, seed=9)),
}


@pytest.mark.parametrize("case", CASES)
def test_the_hf_engine_gives_the_samples_the_sampler_gave_before_engines(eos_lm, case):
    """Same seeds, same samples, to the last bit of every log-prob, through ``sample(model)`` and through
    ``sample(make_engine(...))``; the model is left in training mode as it was. Checked to fail: with the hf
    engine not seeding the global RNG with each chunk's seed."""
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(eos_lm), load_causal_lm(eos_lm)
    cfg_kw, kw = CASES[case]
    cfg = SamplingConfig(**cfg_kw)
    model.train()
    want = legacy_sample(model, tok, PROMPTS, cfg, **kw)
    assert model.training
    via_model = sample(model, tok, PROMPTS, cfg, **kw)
    assert model.training
    engine = make_engine(cfg, model, tok)
    assert isinstance(engine, HFEngine)
    via_engine = sample(engine, tok, PROMPTS, cfg, **kw)
    assert via_model == want and via_engine == want
    n = kw.get("num_return_sequences", 1)
    assert len(want) == len(PROMPTS) * n
    if case != "greedy":  # the EOS cut is exercised both ways
        assert any(s.finished for s in want) and not all(s.finished for s in want)


def test_an_engine_is_sampled_with_its_own_weights_until_synced(eos_lm):
    """``sync_weights`` is how a recipe hands an engine the updated policy; the hf engine samples whatever
    model it was last given (here a copy whose weights differ)."""
    import copy

    from rlhfkit.models.loading import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(eos_lm), load_causal_lm(eos_lm)
    other = copy.deepcopy(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))
    cfg = SamplingConfig(max_new_tokens=6, temperature=0.0)
    engine = make_engine(cfg, model, tok)
    before = sample(engine, tok, PROMPTS, cfg)
    engine.sleep()
    engine.sync_weights(other)
    after = sample(engine, tok, PROMPTS, cfg)
    assert after == legacy_sample(other, tok, PROMPTS, cfg) and after != before


def test_the_hf_engine_runs_the_model_under_bf16_autocast_only_when_asked(eos_lm):
    """``bf16``: every forward of generate returns bf16 logits (autocast), the weights stay fp32, and the
    samples' log-probs are still recorded; by default every forward is fp32, as the test above pins."""
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(eos_lm), load_causal_lm(eos_lm)
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append(out.logits.dtype))
    fp32 = sample(model, tok, PROMPTS, SamplingConfig(max_new_tokens=4, temperature=1.0), seed=1, return_logprobs=True)
    assert seen and set(seen) == {torch.float32}
    seen.clear()
    bf16 = sample(model, tok, PROMPTS, SamplingConfig(max_new_tokens=4, temperature=1.0, bf16=True), seed=1,
                  return_logprobs=True)
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert len(bf16) == len(fp32) and all(len(s.logprobs) == len(s.response_ids) + s.finished for s in bf16)


# ---------------------------------------------------------------- vllm where it cannot run

def _pretend(monkeypatch, vllm_installed: bool, cuda: bool, processes: int = 1):
    monkeypatch.setenv("WORLD_SIZE", str(processes))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: (real("json") if vllm_installed else None) if name == "vllm" else real(name, *a, **k))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)


@pytest.mark.parametrize("vllm_installed, cuda, processes, says", [
    (False, False, 1, ["the vllm package", "pip install -e '.[gpu]'", "a CUDA GPU"]),
    (False, True, 1, ["the vllm package", "pip install -e '.[gpu]'"]),
    (True, False, 1, ["a CUDA GPU"]),
    (True, True, 2, ["one process"]),
])
def test_vllm_where_it_cannot_run_is_refused_naming_the_field_and_the_fix(monkeypatch, vllm_installed, cuda,
                                                                           processes, says):
    _pretend(monkeypatch, vllm_installed, cuda, processes)
    cfg = SamplingConfig(engine="vllm")
    assert cfg.engine is Engine.vllm
    with pytest.raises(ConfigError) as e:
        check_engine(cfg, "ppo.sampling.engine")
    msg = str(e.value)
    assert msg.startswith("ppo.sampling.engine: vllm needs") and "ppo.sampling.engine=hf" in msg
    assert all(s in msg for s in says), msg
    if vllm_installed:
        assert "pip install" not in msg
    with pytest.raises(ConfigError, match="sampling.engine: vllm needs"):
        make_engine(cfg, torch.nn.Linear(1, 1), None)  # before anything is built
    check_engine(SamplingConfig(), "ppo.sampling.engine")  # hf runs anywhere


def test_a_config_naming_vllm_loads_anywhere_and_a_bad_engine_does_not():
    """The config is checked where it runs (a GPU machine), so it parses on a laptop; a typo fails at parse."""
    from rlhfkit.pipeline import PipelineConfig

    cfg = load_config(PipelineConfig, None, ["grpo.sampling.engine=vllm", "grpo.sampling.vllm.gpu_memory_utilization=0.5"])
    assert cfg.grpo.sampling.engine is Engine.vllm and cfg.grpo.sampling.vllm.gpu_memory_utilization == 0.5
    with pytest.raises(ConfigError, match="grpo.sampling.engine.*hf, vllm"):
        load_config(PipelineConfig, None, ["grpo.sampling.engine=tgi"])
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        load_config(PipelineConfig, None, ["grpo.sampling.vllm.gpu_memory_utilization=1.5"])


def test_the_pipeline_refuses_vllm_before_running_any_stage(tmp_path, monkeypatch, capsys):
    """A run whose fifth stage asks for vllm on a machine without it fails before the first stage starts:
    no stage directory, no model loaded. ``rlhfkit grpo ...`` (one stage) fails the same way."""
    from conftest import tiny_pipeline_overrides

    from rlhfkit.cli import main
    from rlhfkit.pipeline import load_pipeline_config, run_pipeline

    _pretend(monkeypatch, vllm_installed=False, cuda=False)
    out = tmp_path / "run"
    cfg = load_pipeline_config(None, tiny_pipeline_overrides(out) + ["stages=[data, pretrain, sft, eval, grpo]",
                                                                     "grpo.sampling.engine=vllm"])
    with pytest.raises(ConfigError, match=r"grpo\.sampling\.engine: vllm needs .*pip install -e '\.\[gpu\]'"):
        run_pipeline(cfg)
    stages = ("data", "pretrain", "sft", "eval", "grpo")
    assert not any((out / s).exists() or (out / f"{s}.partial").exists() for s in stages)
    capsys.readouterr()
    assert main(["eval", f"out={out}", "sampling.engine=vllm"]) == 2
    assert "eval.sampling.engine: vllm needs" in capsys.readouterr().err
    assert not (out / "eval.partial").exists() and not (out / "eval").exists()


# ---------------------------------------------------------------- the recipe's side of the contract

class RecordingEngine(HFEngine):
    """The hf engine, writing down what the recipe asks of it and the weights it is given."""

    def __init__(self, model, tokenizer, device=None):
        super().__init__(model, tokenizer, device)
        self.events: list[str] = []
        self.synced: list[torch.Tensor] = []

    def generate(self, *a, **k):
        self.events.append("generate")
        return super().generate(*a, **k)

    def sync_weights(self, model):
        self.events.append("sync")
        self.synced.append(model.lm_head.weight.detach().clone())
        super().sync_weights(model)

    def sleep(self):
        self.events.append("sleep")

    def close(self):
        self.events.append("close")


def test_the_rl_recipe_sleeps_its_engine_for_each_update_and_syncs_it_after(tmp_path, tiny_lm_dir, monkeypatch):
    """Per step: generate, sleep, (the update), sync with the updated weights; the held-out figures sample the
    final policy; the engine is closed once. Checked to fail: with the sync moved before the update."""
    from accelerate import Accelerator

    from rlhfkit.models.loading import load_causal_lm
    from rlhfkit.recipes import ppo
    from rlhfkit.recipes.ppo import PPOConfig
    from rlhfkit.stage import StageContext
    from rlhfkit.tasks.arith import format_prompt, make_problems

    engines = []
    monkeypatch.setattr(ppo, "make_engine", lambda sampling, *a: engines.append(RecordingEngine(*a)) or engines[-1])
    (tmp_path / "data").mkdir()
    rows = [{"prompt": format_prompt(p), "meta": p.to_meta()} for p in make_problems(8, seed=3, unanswerable_frac=0.25)]
    for name in ("prompts.jsonl", "heldout.jsonl"):
        (tmp_path / "data" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    stage = tmp_path / "ppo.partial"
    stage.mkdir()
    # PPO: its critic's baseline moves the policy even when every response is unfinished (the same score)
    cfg = PPOConfig(policy=str(tiny_lm_dir), algorithm="ppo", reward_source="judge", prompts_per_step=2,
                    minibatch_size=2, ppo_epochs=1, total_steps=2, save_every=0, lr=1e-2, mixed_precision="no",
                    sampling=SamplingConfig(max_new_tokens=6, temperature=1.0, batch_size=8))
    ppo.run(cfg, StageContext(tmp_path, stage, "ppo", Accelerator(cpu=True)))
    (engine,) = engines
    assert engine.events == ["generate", "sleep", "sync"] * 2 + ["generate", "close"]
    start = load_causal_lm(tiny_lm_dir).lm_head.weight
    assert not torch.equal(start, engine.synced[0]) and not torch.equal(engine.synced[0], engine.synced[1])
    final = load_causal_lm(stage / "model").lm_head.weight
    assert torch.equal(engine.synced[-1], final)  # the last sync carried the weights the stage saved
    rows = [json.loads(line) for line in (stage / "log.jsonl").read_text().splitlines()]
    assert all(r["batch_tokens"] > 2 * r["response_length"] for r in rows)  # prompts and responses of 2 rows


# ---------------------------------------------------------------- the weights a vLLM engine is given under LoRA

def test_merged_weights_are_merge_and_unload_s_without_touching_the_policy(tiny_lm_dir):
    from rlhfkit.models.loading import load_causal_lm
    from rlhfkit.models.trainable import LoRAConfig, add_lora, merged_copy, merged_weights

    policy = add_lora(load_causal_lm(tiny_lm_dir), LoRAConfig(r=4, alpha=8.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B starts at 0: give the adapter something to merge
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    got = dict(merged_weights(policy))
    want = merged_copy(policy).state_dict()
    assert got.keys() == want.keys()
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    q = next(k for k in want if k.endswith("q_proj.weight"))
    plain = load_causal_lm(tiny_lm_dir).state_dict()
    assert (got[q] - plain[q]).abs().max() > 1e-3  # the adapter is in it
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in before.items())  # the policy is untouched
    plain_model = load_causal_lm(tiny_lm_dir)
    assert all(torch.equal(v, plain_model.state_dict()[k]) for k, v in merged_weights(plain_model))


# ---------------------------------------------------------------- the GPU check's CPU side

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_checks_the_environment_and_prints_the_plan(tmp_path):
    """``scripts/gpu_check.sh --dry-run`` installs and runs nothing: it reports what it found (python, pip,
    nvidia-smi, the lock, the model package) and the plan, and its last line is one JSON object."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WORK": str(tmp_path / "work")}
    res = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                         env=env, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["dry_run"] is True and report["ready"] is (report["checks"]["nvidia_smi"] is not None and
                                                             all(v is not None for v in report["checks"].values()))
    checks = report["checks"]
    assert checks["python"].startswith("3.") and checks["pip"] and checks["lock"].endswith("requirements-gpu.lock")
    assert "vllm==" in (ROOT / "requirements-gpu.lock").read_text()
    plan = "\n".join(lines[:-1])
    for step in ("install", "pytest -m gpu", "grpo", "ppo", "rollout", "JSON"):
        assert step in plan, (step, plan)
    assert not (tmp_path / "work").exists()  # nothing made, nothing installed


# ---------------------------------------------------------------- the vllm engine's own bookkeeping, against a stand-in

class _StandInLLM:
    """The few ``vllm.LLM`` calls the engine makes, recorded; generation is scripted from each request's seed (a
    finished sequence ends with its stop token, as vLLM's do), every log-prob -0.5 · (position + 1)."""

    def __init__(self, model, **kwargs):
        import types

        self.kwargs, self.calls = kwargs, []
        self.config = json.loads((Path(model) / "config.json").read_text())
        self.weights: dict[str, torch.Tensor] = {}
        self.params = {"model.embed_tokens.weight", "model.norm.weight"}  # what a vLLM Llama would hold, in part
        self.llm_engine = types.SimpleNamespace(engine_core=None)

    def apply_model(self, fn):
        import types

        def load_weights(weights):
            self.weights = {k: v.clone() for k, v in weights}
            return {k for k in self.weights if k in self.params}

        return [fn(types.SimpleNamespace(load_weights=load_weights, named_parameters=lambda: [(p, None) for p in self.params]))]

    def generate(self, prompts, params, use_tqdm=False):
        import types

        self.calls.append("generate")
        out = []
        for prompt, p in zip(prompts, params):
            seqs = []
            for i in range(p.n):
                s = p.seed + i
                ids = [3 + (s + t) % 4 for t in range(min(s % 5, p.max_tokens))]
                if len(ids) < p.max_tokens:
                    ids.append(p.stop_token_ids[0])
                lps = [{tok: types.SimpleNamespace(logprob=-0.5 * (t + 1))} for t, tok in enumerate(ids)]
                seqs.append(types.SimpleNamespace(index=i, token_ids=ids, logprobs=lps if p.logprobs is not None else None))
            out.append(types.SimpleNamespace(outputs=seqs[::-1], prompt=prompt))  # out of order: the engine sorts
        return out

    def sleep(self, level):
        self.calls.append(f"sleep{level}")

    def wake_up(self, tags):
        self.calls.append(f"wake:{','.join(tags)}")

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")


def _stand_in_vllm(monkeypatch):
    import sys
    import types

    class SamplingParams:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = _StandInLLM, SamplingParams
    fake.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    parallel = types.ModuleType("vllm.distributed.parallel_state")
    parallel.cleanup_dist_env_and_memory = lambda: None
    for name, mod in {"vllm": fake, "vllm.distributed": types.ModuleType("vllm.distributed"),
                      "vllm.distributed.parallel_state": parallel}.items():
        monkeypatch.setitem(sys.modules, name, mod)


def test_the_vllm_engine_starts_from_a_config_takes_merged_weights_and_reads_outputs(monkeypatch, eos_lm, tmp_path):
    """Against a stand-in for ``vllm.LLM`` (the real one runs in test_gpu_engines.py): vLLM starts from a directory
    holding a config that names the architecture (no weights: ``load_format="dummy"``), is given the policy's
    weights at once (a LoRA adapter merged) and refuses to serve when one of its weights was not given; a sleep
    is level 2 and a sync after it wakes the weights, loads, then wakes the KV cache (without a sleep, the prefix
    cache is reset instead); each sequence of a chunk gets its own seed, outputs come back in order, cut after EOS,
    with the drawn tokens' log-probs."""
    from rlhfkit.engines import VLLMConfig
    from rlhfkit.engines.vllm import VLLMEngine
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer
    from rlhfkit.models.trainable import LoRAConfig, add_lora, merged_copy

    _stand_in_vllm(monkeypatch)
    tok = load_tokenizer(eos_lm)
    policy = add_lora(load_causal_lm(eos_lm), LoRAConfig(r=2, alpha=4.0))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.fill_(0.1)
    engine = VLLMEngine(policy, tok, VLLMConfig())
    llm = engine.llm
    assert llm.kwargs["load_format"] == "dummy" and llm.kwargs["logprobs_mode"] == "processed_logprobs"
    assert llm.kwargs["enable_sleep_mode"] and llm.kwargs["skip_tokenizer_init"]
    assert llm.config["architectures"] == ["LlamaForCausalLM"]
    want = merged_copy(policy).state_dict()
    assert llm.weights.keys() == want.keys() and all(torch.allclose(llm.weights[k], want[k]) for k in want)

    cfg = SamplingConfig(max_new_tokens=3, temperature=0.9, batch_size=2)
    samples = sample(engine, tok, PROMPTS, cfg, seed=7, num_return_sequences=3, return_logprobs=True)
    assert len(samples) == 15 and [s.prompt for s in samples] == [p for p in PROMPTS for _ in range(3)]
    assert {s.finished for s in samples} == {True, False}
    for s in samples:
        assert tok.eos_token_id not in s.response_ids
        assert s.logprobs == tuple(-0.5 * (t + 1) for t in range(len(s.response_ids) + s.finished))
    seeds = [(s.response_ids, s.finished) for s in samples]
    assert len(set(map(str, seeds))) > 5  # seeds differ across prompts and sequences

    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        sample(engine, tok, PROMPTS[:1], cfg)
    engine.sync_weights(policy)
    assert llm.calls[-3:] == ["sleep2", "wake:weights", "wake:kv_cache"]
    engine.sync_weights(policy)
    assert llm.calls[-1] == "reset_prefix_cache"
    llm.params.add("lm_head.extra")  # a weight the policy does not have
    with pytest.raises(RuntimeError, match="did not provide"):
        engine.sync_weights(policy)
    engine.close()
    assert engine.llm is None
