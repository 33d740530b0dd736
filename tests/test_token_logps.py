"""The output head only at the scored positions (``models.token_logps``) is the same function as the full forward.

Every caller (PPO's policy, reference and update, SFT's and pretraining's loss, DPO's sequence log-probs)
now asks the model for the logits of the positions that predict a scored token only. Each test compares
with what the code did before: the full (B, T, V) logits, log-softmax, read at the scored tokens; values
and gradients to float32 rounding, for a plain and a LoRA model, right and left padding, T = 1 and T ≠ 1.
A hook on the output head checks that it really ran on the scored positions only.
"""
from __future__ import annotations

import pytest
import torch

from rlhfkit.data.collate import encode_prompt, encode_response, pad_batch
from rlhfkit.models import token_logps
from rlhfkit.models.trainable import LoRAConfig, add_lora


def _lm(tiny_lm_dir, lora: int):
    from rlhfkit.models.loading import load_causal_lm

    torch.manual_seed(0)
    model = load_causal_lm(tiny_lm_dir)
    if lora:
        model = add_lora(model, LoRAConfig(r=lora))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.add_(0.2)  # a trained-looking adapter: the LoRA path differs from the base
    return model


def _batch(tok, side: str) -> dict[str, torch.Tensor]:
    """Prompts and responses of different lengths, padded on ``side``; response_mask marks the responses."""
    rows = [("Question: 2 + 3?\n", "Answer: 5"), ("Q: 12 - 7 = ?\n", "Answer: 5 because 12 - 7 = 5"),
            ("Question: what is 3 times 4, exactly?\n", "12")]
    ids, resp = [], []
    for prompt, response in rows:
        p, r = encode_prompt(tok, prompt), encode_response(tok, response)
        ids.append(p + r)
        resp.append([0] * len(p) + [1] * len(r))
    return {"input_ids": pad_batch(ids, tok.pad_token_id, side), "attention_mask": pad_batch([[1] * len(x) for x in ids], 0, side),
            "response_mask": pad_batch(resp, 0, side)}


def _full_logprobs(model, batch, temperature: float = 1.0) -> torch.Tensor:
    """The full forward, as before: (B, T) log-probs, position 0 = 0."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    logp = torch.log_softmax(logits / temperature, -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(logp, (1, 0))


def _head_rows(model) -> tuple[list[int], object]:
    """Rows (positions) the output head sees on each call, through a forward hook on it."""
    seen: list[int] = []
    head = (model.get_base_model() if hasattr(model, "get_base_model") else model).get_output_embeddings()
    handle = head.register_forward_hook(lambda mod, args, out: seen.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    return seen, handle


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out


def _assert_same_grads(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and got
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("lora", [0, 4], ids=["plain", "lora"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_token_logprobs_at_the_response_equal_the_full_forward(tiny_lm_dir, tiny_tokenizer, lora, side):
    from rlhfkit.generation import token_logprobs

    model = _lm(tiny_lm_dir, lora)
    batch = _batch(tiny_tokenizer, side)
    scored = batch["response_mask"].bool()
    weights = torch.linspace(-1, 2, scored.numel()).reshape(scored.shape)  # a different weight per token: none can swap
    for temperature in (1.0, 0.7):
        want = _full_logprobs(model, batch, temperature)
        (want * scored * weights).sum().backward()
        want_grads = _grads(model)
        seen, handle = _head_rows(model)
        got = token_logprobs(model, batch["input_ids"], batch["attention_mask"], temperature, scored=scored)
        handle.remove()
        assert seen == [int(scored.sum())]  # the head ran at the positions predicting a response token, no others
        torch.testing.assert_close(got[scored], want[scored], rtol=1e-5, atol=1e-5)
        assert (got[~scored] == 0).all()
        (got * weights).sum().backward()
        _assert_same_grads(_grads(model), want_grads)


def test_without_masked_logits_to_keep_the_full_logits_are_read_at_the_mask(tiny_lm_dir, tiny_tokenizer, monkeypatch):
    """A transformers without (B, T) bool ``logits_to_keep`` (the fallback): the same values from the full logits."""
    from rlhfkit.generation import token_logprobs

    model = _lm(tiny_lm_dir, 0)
    batch = _batch(tiny_tokenizer, "right")
    scored = batch["response_mask"].bool()
    with torch.no_grad():
        sliced = token_logprobs(model, batch["input_ids"], batch["attention_mask"], scored=scored)
        monkeypatch.setattr(token_logps, "_keeps_masked_positions", lambda: False)
        seen, handle = _head_rows(model)
        full = token_logprobs(model, batch["input_ids"], batch["attention_mask"], scored=scored)
        handle.remove()
    assert seen == [batch["input_ids"].numel()]
    torch.testing.assert_close(sliced, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lora", [0, 4], ids=["plain", "lora"])
def test_entropy_is_the_full_forwards_and_has_gradients_only_when_asked(tiny_lm_dir, tiny_tokenizer, lora):
    from rlhfkit.generation import token_logprobs_and_entropy

    model = _lm(tiny_lm_dir, lora)
    batch = _batch(tiny_tokenizer, "right")
    scored = batch["response_mask"].bool()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float() / 0.7
    logp_full = torch.log_softmax(logits, -1)
    want = torch.nn.functional.pad(-(logp_full.exp() * logp_full).sum(-1), (1, 0))
    want[scored].sum().backward()
    want_grads = _grads(model)
    args = (model, batch["input_ids"], batch["attention_mask"], 0.7)
    logp, entropy = token_logprobs_and_entropy(*args, scored=scored)
    assert logp.requires_grad and not entropy.requires_grad  # logged only: no autograd graph for it
    torch.testing.assert_close(entropy[scored], want[scored].detach(), rtol=1e-5, atol=1e-5)
    _, entropy = token_logprobs_and_entropy(*args, scored=scored, entropy_grad=True)
    entropy.sum().backward()
    _assert_same_grads(_grads(model), want_grads)


@pytest.mark.parametrize("entropy_coef", [0.0, 0.1])
def test_ppo_update_takes_the_entropy_gradient_only_with_an_entropy_bonus(tiny_lm_dir, tiny_tokenizer, monkeypatch,
                                                                         entropy_coef):
    from accelerate import Accelerator

    from rlhfkit.generation import SamplingConfig, token_logprobs
    from rlhfkit.recipes import ppo

    model = _lm(tiny_lm_dir, 0)
    batch = _batch(tiny_tokenizer, "right")
    mask = batch["response_mask"]
    with torch.no_grad():
        old = token_logprobs(model, batch["input_ids"], batch["attention_mask"], scored=mask.bool())
    B, T = mask.shape
    z = torch.zeros(B, T)
    ro = ppo.Rollout(batch["input_ids"], batch["attention_mask"], mask, old, old, z, torch.zeros(B), torch.zeros(B), z,
                     None, None, [])
    seen = []

    def recording(*args, **kwargs):
        logp, ent = token_logprobs_and_entropy(*args, **kwargs)
        seen.append(ent.requires_grad)
        return logp, ent

    token_logprobs_and_entropy = ppo.token_logprobs_and_entropy
    monkeypatch.setattr(ppo, "token_logprobs_and_entropy", recording)
    cfg = ppo.PPOConfig(algorithm="rloo", group_size=3, prompts_per_step=1, minibatch_size=3, ppo_epochs=1,
                        entropy_coef=entropy_coef, sampling=SamplingConfig(max_new_tokens=8), mixed_precision="no")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    stats = ppo.ppo_update(model, None, opt, None, sched, None, ro, mask * 1.0, None, cfg, 0.0, Accelerator(cpu=True),
                           torch.Generator().manual_seed(0))
    assert seen == [entropy_coef > 0]
    assert stats["entropy"] > 0


@pytest.mark.parametrize("lora", [0, 4], ids=["plain", "lora"])
def test_sft_loss_at_the_labelled_positions_equals_the_full_cross_entropy(tiny_lm_dir, tiny_tokenizer, lora):
    """``training.token_loss_sum`` (SFT, pretraining): Σ −log p over labels ≠ −100, as the full forward's
    cross-entropy gave it, values and gradients; the head sees the n_loss_tokens positions only."""
    from rlhfkit.data.collate import collate_sft, tokenize_demonstrations
    from rlhfkit.data.loading import Demonstration
    from rlhfkit.training import token_loss_sum

    model = _lm(tiny_lm_dir, lora)
    demos = [Demonstration(f"Question: {i} + {i * 7}?\n", "Answer: " + " so ".join(["x"] * i)) for i in range(1, 5)]
    examples, _ = tokenize_demonstrations(tiny_tokenizer, demos, 128)
    batch = collate_sft(examples, tiny_tokenizer.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                                             ignore_index=-100, reduction="sum")
    want.backward()
    want_grads = _grads(model)
    seen, handle = _head_rows(model)
    got = token_loss_sum(model, batch)
    handle.remove()
    assert seen == [sum(e.n_loss_tokens for e in examples)]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.backward()
    _assert_same_grads(_grads(model), want_grads)


@pytest.mark.parametrize("layout", ["concatenated", "prompt_cache"])
def test_dpo_sequence_logps_equal_the_full_forward(tiny_lm_dir, tiny_tokenizer, layout):
    from rlhfkit.data.pairs import TokenizedPair, collate_pairs
    from rlhfkit.models.sequence_logps import pair_forward

    tok = tiny_tokenizer
    model = _lm(tiny_lm_dir, 4)
    pairs = [TokenizedPair(encode_prompt(tok, f"Question: {i} + 2?\n" + "and " * i), encode_response(tok, f"Answer: {i + 2}"),
                           encode_response(tok, "Answer: " + "1" * (3 - i))) for i in range(3)]
    batch = collate_pairs(pairs, tok.pad_token_id)
    resp = batch["response_mask"].bool()
    weights = torch.linspace(-1, 1, 2 * len(pairs))
    want = (_full_logprobs(model, batch) * resp).sum(1)
    (want * weights).sum().backward()
    want_grads = _grads(model)
    got, n = pair_forward(model, pairs, tok.pad_token_id, "cpu", layout)
    assert n.tolist() == resp.sum(1).tolist()
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
    (got * weights).sum().backward()
    _assert_same_grads(_grads(model), want_grads)


def test_unpadded_sft_collate_by_hand():
    """Examples [1 2 3] (labels −100 2 3) and [4 5] (labels −100 5): one row 1 2 3 4 5, labels −100 2 3 −100 5,
    positions 0 1 2 0 1; views (L = 3) rows 0 1 2 and 3 4 (padded with 3); token j of example i reads i·3 + j."""
    from rlhfkit.data.collate import IGNORE, TokenizedExample, collate_sft_unpadded

    b = collate_sft_unpadded([TokenizedExample([1, 2, 3], [IGNORE, 2, 3]), TokenizedExample([4, 5], [IGNORE, 5])])
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert b["labels"].tolist() == [[IGNORE, 2, 3, IGNORE, 5]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert b["view_index"].tolist() == [[0, 1, 2], [3, 4, 3]]
    assert b["view_source"].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("lora", [0, 4], ids=["plain", "lora"])
def test_unpadded_sft_batch_gives_the_padded_loss_and_gradients(tiny_lm_dir, tiny_tokenizer, lora):
    """SFT's padding-free batch (one row, view attention) is the padded batch's function: the same token-loss
    sum and gradients to float32 rounding, the head on the same n_loss_tokens positions; the model's own
    attention is back afterwards."""
    from rlhfkit.data.collate import collate_sft, collate_sft_unpadded, tokenize_demonstrations
    from rlhfkit.data.loading import Demonstration
    from rlhfkit.training import token_loss_sum

    model = _lm(tiny_lm_dir, lora)
    demos = [Demonstration(f"Question: {i} + {i * 7}?\n" + "so " * (3 - i), "Answer: " + " so ".join(["x"] * i))
             for i in range(1, 5)]
    examples, _ = tokenize_demonstrations(tiny_tokenizer, demos, 128)
    padded = token_loss_sum(model, collate_sft(examples, tiny_tokenizer.pad_token_id))
    padded.backward()
    want_grads = _grads(model)
    seen, handle = _head_rows(model)
    unpadded = token_loss_sum(model, collate_sft_unpadded(examples))
    handle.remove()
    assert seen == [sum(e.n_loss_tokens for e in examples)]
    torch.testing.assert_close(unpadded, padded.detach(), rtol=1e-5, atol=1e-5)
    unpadded.backward()
    _assert_same_grads(_grads(model), want_grads)
    inner = model.get_base_model() if lora else model
    assert inner.config._attn_implementation == "sdpa"
