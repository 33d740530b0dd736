"""LoRA in every stage, one chat-template renderer, the ecosystem's data formats, truncation, and model references.

Tiny models built from transformers configs; the real-model path is tests/test_real_models.py.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from rlhfkit.data.chat import Message, parse_messages, render_prompt
from rlhfkit.data.collate import Truncation, encode_prompt, encode_response, tokenize_demonstrations
from rlhfkit.data.loading import DataError, Demonstration, load_demonstrations, load_prompts
from rlhfkit.data.preferences import load_pairs
from rlhfkit.models.trainable import LoRAConfig, add_lora, make_trainable, reference_mode

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture
def chat_tokenizer(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = TEMPLATE
    return tok


def _lm(tiny_lm_dir):
    from rlhfkit.models.loading import load_causal_lm

    return load_causal_lm(tiny_lm_dir)


# ------------------------------------------------------------------ LoRA

def test_lora_trains_only_the_adapters(tiny_lm_dir, tiny_tokenizer):
    """After SFT steps under LoRA every base weight is bit-identical; only lora_A/lora_B moved."""
    from accelerate import Accelerator

    from rlhfkit.data.collate import collate_sft
    from rlhfkit.io import JsonlLog
    from rlhfkit.training import TrainConfig, train_lm

    base = {k: v.clone() for k, v in _lm(tiny_lm_dir).state_dict().items()}
    model = make_trainable(_lm(tiny_lm_dir), LoRAConfig(r=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    demos = [Demonstration(f"Question: {i} + 1?\n", f"Answer: {i + 1}") for i in range(8)]
    examples, _ = tokenize_demonstrations(tiny_tokenizer, demos, 64)
    train_lm(model, len(examples), lambda idx: collate_sft([examples[i] for i in idx], tiny_tokenizer.pad_token_id),
             [e.n_loss_tokens for e in examples], TrainConfig(lr=1e-2, max_steps=3, batch_size=4, warmup_steps=0),
             Accelerator(cpu=True), JsonlLog(Path("unused"), enabled=False))
    after = model.get_base_model().state_dict()
    for k, v in base.items():
        key = next(a for a in after if a.replace("base_layer.", "") == k and "lora_" not in a)
        assert torch.equal(after[key], v), k
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, lora_before[n])]
    assert any("lora_B" in n for n in moved)


def test_reward_model_under_lora_trains_adapters_and_the_whole_head(tiny_lm_dir):
    from rlhfkit.recipes.reward import RewardConfig, _build

    net, _ = _build(RewardConfig(lora=LoRAConfig(r=4)), tiny_lm_dir, "reward")
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable
    assert all("lora_" in n or n.startswith("head.") for n in trainable)
    assert any("lora_" in n for n in trainable)


def test_adapter_disabled_reference_equals_the_base_model_exactly(tiny_lm_dir, tiny_tokenizer):
    """The reference of DPO/DNO/PPO under LoRA is the base with its adapter off: the same log-probs, bit for bit."""
    from rlhfkit.generation import token_logprobs

    ids = torch.tensor([encode_prompt(tiny_tokenizer, "Question: 2 + 3?\n") + encode_response(tiny_tokenizer, "Answer: 5")])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        base = token_logprobs(_lm(tiny_lm_dir), ids, mask)
        policy = add_lora(_lm(tiny_lm_dir), LoRAConfig(r=4))
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.add_(0.3)  # a trained-looking adapter
        adapted = token_logprobs(policy, ids, mask)
        with reference_mode(policy) as ref:
            reference = token_logprobs(ref, ids, mask)
    assert not torch.equal(adapted, base)
    assert torch.equal(reference, base)


def test_dpo_reference_logprobs_under_lora_are_the_base_models(tiny_lm_dir, tiny_tokenizer):
    from rlhfkit.data.pairs import tokenize_pairs
    from rlhfkit.models.sequence_logps import precompute_logps

    class P:
        prompt, chosen, rejected = "Question: 1 + 1?\n", "Answer: 2", "Answer: 3"

    pairs = tokenize_pairs(tiny_tokenizer, [P(), P()], 64)
    plain = precompute_logps(_lm(tiny_lm_dir), pairs, tiny_tokenizer.pad_token_id, 8, torch.device("cpu"))
    policy = add_lora(_lm(tiny_lm_dir), LoRAConfig(r=4))
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.add_(0.3)
    with reference_mode(policy) as ref:
        under_lora = precompute_logps(ref, pairs, tiny_tokenizer.pad_token_id, 8, torch.device("cpu"))
    for k in ("chosen", "rejected"):
        assert torch.allclose(plain[k], under_lora[k], atol=1e-6, rtol=0)


def test_lora_keys_are_checked():
    with pytest.raises(ValueError, match="lora.r"):
        LoRAConfig(r=-1)
    with pytest.raises(ValueError, match="lora.dropout"):
        LoRAConfig(r=4, dropout=1.5)


# ------------------------------------------------------------------ one chat renderer

@pytest.mark.parametrize("templated", [True, False], ids=["chat-template", "plain"])
def test_one_renderer_for_training_labelling_eval_and_serving(tiny_lm_dir, tiny_tokenizer, chat_tokenizer, templated):
    """SFT tokenization, sampling (label, RL, eval), the reward model and serve see the same prompt ids.

    Without a template a single user turn is its plain text (what training on ``{"prompt"}`` used); a
    server that wrapped it as ``user: ...\nassistant:`` would answer in a format the model never saw.
    """
    from rlhfkit.generation import SamplingConfig, sample
    from rlhfkit.models.reward import HeadInfo, encode
    from rlhfkit.serve import ChatModel
    from rlhfkit.serve_requests import validate_request

    tok = chat_tokenizer if templated else tiny_tokenizer
    raw = ([{"role": "system", "content": "Be brief."}] if templated else []) + [{"role": "user", "content": "Question: 2 + 2?"}]
    conv = parse_messages(raw)
    expected = tok(render_prompt(tok, conv), add_special_tokens=False)["input_ids"]
    if templated:
        assert render_prompt(tok, conv).startswith("<|system|>Be brief.\n<|user|>Question: 2 + 2?\n<|assistant|>")
    else:
        assert expected == tok("Question: 2 + 2?", add_special_tokens=False)["input_ids"]
    # training (SFT): prompt part of the example
    (ex,), _ = tokenize_demonstrations(tok, [Demonstration(conv, "Answer: 4")], 128)
    assert ex.input_ids[:len(expected)] == expected and ex.labels[:len(expected)] == [-100] * len(expected)
    # labelling, RL rollouts and eval sample through generation.sample
    model = _lm(tiny_lm_dir)
    (s,) = sample(model, tok, [conv], SamplingConfig(max_new_tokens=2, temperature=0.0))
    assert s.prompt_ids == expected
    # reward model input
    ids, _ = encode(tok, HeadInfo(causal=True, max_len=256), conv, "Answer: 4")
    assert ids[:len(expected)] == expected
    # serve: capture what generate() receives
    seen = {}
    original = model.generate

    def spy(**kw):
        seen["ids"] = kw["input_ids"][0].tolist()
        return original(**kw)

    model.generate = spy
    ChatModel(model, tok, "tiny").complete(validate_request({"messages": raw, "temperature": 0, "max_tokens": 2}, 16))
    assert seen["ids"] == expected


def test_without_a_template_one_user_turn_is_the_plain_training_format(tiny_tokenizer):
    assert render_prompt(tiny_tokenizer, "Question: 1?\n") == "Question: 1?\n"
    assert render_prompt(tiny_tokenizer, (Message("user", "Question: 1?\n"),)) == "Question: 1?\n"
    two = (Message("user", "hi"), Message("assistant", "hello"), Message("user", "sum?"))
    assert render_prompt(tiny_tokenizer, two) == "user: hi\nassistant: hello\nuser: sum?\nassistant:"


# ------------------------------------------------------------------ data formats

def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sft_formats_messages_prompt_completion_and_csv(tmp_path):
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    got = load_demonstrations(_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}]))
    assert got[0].prompt == (Message("system", "s"), Message("user", "q")) and got[0].response == "a"
    got = load_demonstrations(_jsonl(tmp_path / "c.jsonl", [{"prompt": "q", "completion": "a"}]))
    assert (got[0].prompt, got[0].response) == ("q", "a")
    got = load_demonstrations(_jsonl(tmp_path / "cc.jsonl", [{"prompt": msgs[1:2], "completion": msgs[2:]}]))
    assert got[0].prompt == (Message("user", "q"),) and got[0].response == "a"
    (tmp_path / "d.csv").write_text('prompt,completion\n"q, with comma",a\n')
    got = load_demonstrations(tmp_path / "d.csv")
    assert (got[0].prompt, got[0].response) == ("q, with comma", "a") and got[0].where.endswith("d.csv:2")
    with pytest.raises(DataError, match=r"m2.jsonl:1: field 'messages' must end with an assistant message"):
        load_demonstrations(_jsonl(tmp_path / "m2.jsonl", [{"messages": msgs[:2]}]))


def test_conversational_pairs_explicit_and_implicit_prompt(tmp_path):
    u = {"role": "user", "content": "q"}
    rows = [
        {"prompt": [u], "chosen": [{"role": "assistant", "content": "good"}], "rejected": [{"role": "assistant", "content": "bad"}]},
        {"chosen": [u, {"role": "assistant", "content": "good"}], "rejected": [u, {"role": "assistant", "content": "bad"}]},
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
    ]
    pairs = load_pairs(_jsonl(tmp_path / "p.jsonl", rows)).pairs
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs[:2]] == [((Message("user", "q"),), "good", "bad")] * 2
    assert (pairs[2].prompt, pairs[2].chosen) == ("q", "good")
    bad = {"chosen": [u, {"role": "assistant", "content": "a"}], "rejected": [{"role": "user", "content": "other"},
                                                                         {"role": "assistant", "content": "b"}]}
    with pytest.raises(DataError, match=r"q.jsonl:1: 'chosen' and 'rejected' conversations differ"):
        load_pairs(_jsonl(tmp_path / "q.jsonl", [bad]))


def test_prompt_formats(tmp_path):
    rows = [{"prompt": "a"}, {"messages": [{"role": "user", "content": "b"}]},
            {"messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "drop me"}]}]
    got = load_prompts(_jsonl(tmp_path / "p.jsonl", rows))
    assert [r.prompt for r in got] == ["a", (Message("user", "b"),), (Message("user", "c"),)]


def test_non_utf8_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(b'{"prompt": "a"}\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not UTF-8"):
        load_prompts(f)


# ------------------------------------------------------------------ truncation

def test_truncation_cuts_and_counts(tiny_tokenizer):
    tok = tiny_tokenizer
    long_prompt, long_resp = "Tom has 3 apples. " * 6, "3 + 4 = 7\n" * 6
    demos = [Demonstration("Question: 1?\n", "Answer: 1"), Demonstration(long_prompt, "Answer: 2"),
             Demonstration("Question: 3?\n", long_resp)]
    p1, r1 = len(encode_prompt(tok, long_prompt)), len(encode_response(tok, long_resp))
    max_len = 30
    assert p1 + 4 > max_len and r1 + 4 > max_len  # examples 2 and 3 are too long, example 1 fits
    with pytest.raises(DataError, match="longer than"):
        tokenize_demonstrations(tok, demos, max_len, Truncation.error)
    left, n_left = tokenize_demonstrations(tok, demos[:2], max_len, Truncation.left)
    assert n_left == 1 and len(left[1].input_ids) == max_len
    # left keeps the prompt's end and the whole response
    assert left[1].input_ids[-len(encode_response(tok, "Answer: 2")):] == encode_response(tok, "Answer: 2")
    right, n_right = tokenize_demonstrations(tok, [demos[0], demos[2]], max_len, Truncation.right)
    assert n_right == 1 and len(right[1].input_ids) == max_len
    assert right[1].input_ids[:len(encode_prompt(tok, "Question: 3?\n"))] == encode_prompt(tok, "Question: 3?\n")
    with pytest.raises(DataError, match="prompt is"):  # right never cuts a prompt
        tokenize_demonstrations(tok, [Demonstration(long_prompt * 3, "a")], max_len, Truncation.right)


def test_dpo_truncation_counts_pairs(tiny_tokenizer):
    from rlhfkit.data.pairs import tokenize_pairs

    class P:
        def __init__(self, prompt, chosen, rejected):
            self.prompt, self.chosen, self.rejected = prompt, chosen, rejected

    pairs = [P("q\n", "a", "b"), P("q\n", "a", "3 + 4 = 7\n" * 8), P("Tom has 3 apples. " * 8, "a", "b")]
    counts: dict = {}
    out = tokenize_pairs(tiny_tokenizer, pairs, 24, Truncation.left, counts)
    assert counts["truncated"] == 2
    assert all(len(t.prompt_ids) + max(len(t.chosen_ids), len(t.rejected_ids)) <= 24 for t in out)


# ------------------------------------------------------------------ model references

def test_offline_hub_name_fails_fast_naming_the_model(tmp_path, monkeypatch, capsys):
    from rlhfkit.cli import main

    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "response": "a"}])
    for offline, endpoint in (("1", None), ("0", "http://127.0.0.1:9")):  # offline flag; no route to the hub
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        if endpoint:
            monkeypatch.setenv("HF_ENDPOINT", endpoint)
        t0 = time.time()
        code = main(["sft", "model=nobody-org/no-such-model", f"data={data}", f"out={tmp_path / offline}"])
        took = time.time() - t0
        err = capsys.readouterr().err
        assert code == 2 and "nobody-org/no-such-model" in err and took < 5.0, (code, err, took)
        assert not (tmp_path / offline / "sft").exists()


def test_missing_local_model_and_a_directory_without_weights(tmp_path):
    from rlhfkit.models.local import ModelNotFound, resolve_pretrained

    with pytest.raises(ModelNotFound, match="does not exist"):
        resolve_pretrained(str(tmp_path / "nope" / "model"))
    d = tmp_path / "empty"
    d.mkdir()
    (d / "config.json").write_text("{}")
    with pytest.raises(ModelNotFound, match="no weights"):
        resolve_pretrained(str(d))


def test_lora_merge_false_saves_the_adapter_as_model_and_it_loads(tiny_lm_dir, tiny_tokenizer, tmp_path):
    """``lora.merge: false``: model/ is the adapter alone; load_causal_lm puts it on its base and merges."""
    from rlhfkit.generation import token_logprobs
    from rlhfkit.models.loading import load_causal_lm
    from rlhfkit.models.trainable import save_trained

    policy = add_lora(_lm(tiny_lm_dir), LoRAConfig(r=4))
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.add_(0.3)
    save_trained(policy, tiny_tokenizer, tmp_path, LoRAConfig(r=4, merge=False))
    assert (tmp_path / "model" / "adapter_config.json").exists() and not (tmp_path / "model" / "config.json").exists()
    ids = torch.tensor([encode_prompt(tiny_tokenizer, "Question: 2 + 3?\n")])
    with torch.no_grad():
        want = token_logprobs(policy, ids, torch.ones_like(ids))
        got = token_logprobs(load_causal_lm(tmp_path / "model"), ids, torch.ones_like(ids))
    assert (want - got).abs().max().item() < 1e-5


@pytest.mark.parametrize("lora", [0, 4])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_lm_dir, tiny_tokenizer, lora):
    from rlhfkit.data.collate import collate_sft
    from rlhfkit.training import token_loss_sum

    demos = [Demonstration(f"Question: {i} + 1?\n", f"Answer: {i + 1}") for i in range(4)]
    examples, _ = tokenize_demonstrations(tiny_tokenizer, demos, 64)
    batch = collate_sft(examples, tiny_tokenizer.pad_token_id)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = make_trainable(_lm(tiny_lm_dir), LoRAConfig(r=lora), gradient_checkpointing=ckpt)
        if lora:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.add_(0.1)
        model.train()
        loss = token_loss_sum(model, batch)
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    assert abs(grads[0][0] - grads[1][0]) < 1e-5
    for n, g in grads[0][1].items():
        assert torch.allclose(g, grads[1][1][n], atol=1e-6), n
    assert (model.get_base_model() if lora else model).is_activation_checkpointing  # it really was on
