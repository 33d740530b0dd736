"""The ``vllm`` rollout engine: vLLM colocated in the training process, on the training GPU.

Written against vllm 0.32.0 (``requirements-gpu.lock``; its torch is our torch==2.13.0). ``vllm`` is
imported only when an engine is built, so the base install never needs it.

How it is wired, and the trap each choice closes:

- In-process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` puts vLLM's engine core in this process, so
  ``LLM.apply_model`` hands our tensors to its model directly (no pickling, no second CUDA context).
  One process only: under ``accelerate launch`` with several processes each would need vLLM's
  ``external_launcher`` backend, which is not wired here (an error says so).
- Weights only ever come from the policy: the engine starts from a directory holding the model's
  config alone (``load_format="dummy"``), and :meth:`VLLMEngine.sync_weights` loads the policy's
  weights at once and after every update with the model's own ``load_weights`` (the path TRL's
  colocate mode takes). A LoRA policy's adapter is merged into the weights it sends
  (``models.trainable.merged_weights``); the policy itself is not touched. A vLLM weight the policy
  did not provide is an error, never a random weight left in place.
- Sleep (``vllm.sleep``): before an update the engine sleeps at level 2 (weights and KV cache
  released; the next sync rewrites every weight anyway) and ``sync_weights`` wakes the weights,
  loads them, then wakes the KV cache. Without sleep, the prefix cache is reset after a sync: it
  holds keys and values computed with the old weights.
- Token ids in (``TokensPrompt``), token ids out; EOS is the tokenizer's (``ignore_eos`` with
  ``stop_token_ids=[eos]``, as ``generate`` is given it), not the one in the model's
  generation config. The stop token is kept in the output; ``sample`` cuts after it.
- Log-probs: ``logprobs_mode="processed_logprobs"`` returns log softmax(logits / T) of the drawn token
  (T = 1 when greedy), as the HF engine records them; with top_p < 1 vLLM's are renormalised over the
  nucleus the token was drawn from (HF's are taken before top-p).
- Seeds: prompt j of a chunk drawn with seed s gets seed s + j·n, and vLLM gives its i-th sequence
  s + j·n + i, so no two sequences share a random stream. Starting vLLM reseeds torch's global RNG
  (its ``seed``, 0 here): build the engine after the models are initialised.
"""
from __future__ import annotations

import copy
import os
import tempfile
import weakref
from typing import Sequence

import torch

from rlhfkit.engines import Generated, VLLMConfig
from rlhfkit.engines.hf import unwrap
from rlhfkit.models.trainable import is_peft, merged_weights


class VLLMEngine:
    """vLLM serving the weights of ``model`` (synced in at once); see the module docstring."""

    def __init__(self, model, tokenizer, cfg: VLLMConfig):
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise NotImplementedError("sampling.engine=vllm runs in one process on one GPU; with several processes "
                                      "(accelerate launch) use engine=hf")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # before vllm reads it: LLM.apply_model in-process
        from vllm import LLM

        self.cfg = cfg
        self.eos = tokenizer.eos_token_id
        self.asleep = False
        inner = unwrap(model)
        base = inner.get_base_model() if is_peft(inner) else inner
        self._config_dir = tempfile.TemporaryDirectory(prefix="rlhfkit-vllm-")
        config = copy.deepcopy(base.config)
        config.architectures = [type(base).__name__]  # what vLLM builds; only a model's save_pretrained sets it
        config.save_pretrained(self._config_dir.name)  # config only: the weights come from sync_weights
        if getattr(base, "generation_config", None) is not None:
            base.generation_config.save_pretrained(self._config_dir.name)
        self.llm = LLM(
            model=self._config_dir.name,
            load_format="dummy",
            skip_tokenizer_init=True,  # prompts are token ids; text is decoded by our tokenizer
            dtype=cfg.dtype,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            enable_sleep_mode=cfg.sleep,
            max_model_len=cfg.max_model_len or None,
            enforce_eager=cfg.enforce_eager,
            logprobs_mode="processed_logprobs",
            seed=0,
        )
        # a list the shutdown empties, so that nothing holds the LLM while its memory is given back
        self._release = weakref.finalize(self, _shutdown, [self.llm], self._config_dir)
        self.sync_weights(model)

    def generate(self, prompt_ids: Sequence[list[int]], cfg, n: int, seed: int,
                 return_logprobs: bool) -> list[Generated]:
        from vllm import SamplingParams, TokensPrompt

        if self.asleep:
            raise RuntimeError("the vLLM engine is asleep: sync_weights(policy) after the update, before sampling")
        greedy = cfg.temperature <= 0
        params = [SamplingParams(
            n=n,
            temperature=0.0 if greedy else cfg.temperature,
            top_p=1.0 if greedy else cfg.top_p,
            max_tokens=cfg.max_new_tokens,
            seed=seed + j * n,
            ignore_eos=True,  # the model's generation-config EOS is not ours: stop at the tokenizer's only
            stop_token_ids=[self.eos],
            logprobs=0 if return_logprobs else None,  # 0: only the drawn token's
            detokenize=False,
        ) for j in range(len(prompt_ids))]
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
        out: list[Generated] = []
        for request in self.llm.generate(prompts, params, use_tqdm=False):
            for seq in sorted(request.outputs, key=lambda s: s.index):
                ids = list(seq.token_ids)
                logprobs = [seq.logprobs[t][tok].logprob for t, tok in enumerate(ids)] if return_logprobs else None
                out.append(Generated(ids, logprobs))
        return out

    def sync_weights(self, model) -> None:
        if self.asleep:
            self.llm.wake_up(tags=["weights"])  # the KV cache stays released while the weights are written
        weights = merged_weights(unwrap(model))

        def load(vllm_model) -> list[str]:
            loaded = vllm_model.load_weights(weights)
            return sorted({name for name, _ in vllm_model.named_parameters()} - set(loaded or ()))

        missing = self.llm.apply_model(load)[0]
        if missing:
            raise RuntimeError(f"vLLM's model has {len(missing)} weights the policy did not provide "
                               f"(e.g. {missing[:4]}): its architecture does not match the policy's")
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        else:
            self.llm.reset_prefix_cache()  # its keys and values came from the old weights
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the copies are done before vLLM reads the weights

    def sleep(self) -> None:
        if self.cfg.sleep and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True

    def close(self) -> None:
        """Stop vLLM and give back its memory (once). A recipe closes its engine when it ends; one stopped by an
        exception drops it unclosed, and the same release runs when the engine is garbage-collected."""
        self.llm = None
        self._release()


def _shutdown(holder: list, config_dir: tempfile.TemporaryDirectory) -> None:
    """Stop vLLM's in-process engine core (``holder``'s one LLM) and give back its GPU memory and process group."""
    import gc

    llm = holder.pop()
    core = getattr(llm.llm_engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm, core
    gc.collect()
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    cleanup_dist_env_and_memory()
    config_dir.cleanup()

