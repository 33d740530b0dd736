"""The reward model's packed layout (one unpadded row, each prompt once, attention by views) against padded rows.

Packed is a fast path, so it must be the same function as the padded one: the same sequences token for
token (those of ``models.reward.encode``), the same scores and the same gradients of the Bradley-Terry loss
(to float32 rounding), with prompts of different lengths, groups of 2 and 3 responses, a sequence cut to
``max_len``, either padding side, both pooling rules of a causal model and ODIN's two heads.

Both read their ids from a ``TokenCache`` (each text tokenized once a training run): a filled, reused cache
collates the same batches as encoding afresh, and training reads it without tokenizing again.
"""
from __future__ import annotations

import copy
import warnings
from collections import Counter

import pytest
import torch

from rlhfkit.data.collate import collate_shared_prefixes, encode_prompt, encode_response
from rlhfkit.models.reward import HeadInfo, ScalarModel, collate, encode
from rlhfkit.models import reward_layout
from rlhfkit.models.reward_layout import RewardLayout, TokenCache, collate_texts, effective_layout, pack_texts


def _net(tok, family="llama", kv_heads=None, pooling="last", max_len=100, **extra):
    import transformers

    torch.manual_seed(0)
    if family == "gpt2":  # learned absolute positions instead of RoPE
        cfg = transformers.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      attn_implementation="sdpa")
    else:
        cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
               "mistral": transformers.MistralConfig}[family]
        cfg = cls(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=kv_heads or 4, head_dim=8, max_position_embeddings=256, attn_implementation="sdpa",
                  **extra)
    return ScalarModel(transformers.AutoModel.from_config(cfg), HeadInfo(pooling=pooling, max_len=max_len)).eval()


def _texts():
    """Three prompts of different lengths with 2, 3 and 2 responses (interleaved, as a batch's unique texts
    come), the last response long enough that prompt + response exceeds max_len = 100 and is cut."""
    from rlhfkit.tasks.arith import format_prompt, make_problems

    q = [format_prompt(p) for p in make_problems(3, seed=5, unanswerable_frac=0.3)]
    return [(q[0], "Answer: 12"), (q[1], "Answer: 7"), (q[0], "Answer: 1 and more words"),
            (q[1], "x"), (q[2], "Answer: 3 3"), (q[1], "Answer: 40 then 2"),
            (q[2], "Answer: 5" + " and more words" * 8)]


def _bt_loss(scores):
    """Bradley-Terry over the pairs of each prompt's responses (first ≻ the others), a different pair each row."""
    pairs = [(0, 2), (1, 3), (1, 5), (3, 5), (4, 6)]
    c, r = scores[[i for i, _ in pairs]], scores[[j for _, j in pairs]]
    return -torch.nn.functional.logsigmoid(c - r).mean()


def _scores_and_grads(net, tok, texts, layout, side="right", **forward_kw):
    net.zero_grad()
    if layout == "packed":
        batch, rows = collate_texts(net, TokenCache(tok, net.info), texts, RewardLayout.packed, "cpu")
        assert "token_views" in batch  # really packed
        scores = net(**batch, **forward_kw)[rows]
    else:
        enc = [encode(tok, net.info, p, r) for p, r in texts]
        scores = net(**collate([e[0] for e in enc], None, tok.pad_token_id, side), **forward_kw)
    _bt_loss(scores if scores.dim() == 1 else scores.sum(1)).backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad()
    return scores.detach(), grads


def _assert_same(tok, net, texts, **forward_kw):
    packed, packed_grads = _scores_and_grads(net, tok, texts, "packed", **forward_kw)
    for side in ("right", "left"):
        padded, padded_grads = _scores_and_grads(net, tok, texts, "padded", side, **forward_kw)
        torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
        assert packed_grads.keys() == padded_grads.keys() and len(padded_grads) > 4
        # every weight matrix gets a gradient (a zero one would prove nothing; BT is blind to the head's bias)
        assert all(g.abs().max() > 0 for name, g in padded_grads.items() if name.endswith("weight"))
        # float32 rounding: an embedding row's gradient sums over every occurrence of its token, in another
        # order packed than padded; 1e-5 of the largest gradient (a wrong position or view moves it by ~1e-1)
        scale = max(g.abs().max().item() for g in padded_grads.values())
        for name, g in padded_grads.items():
            torch.testing.assert_close(packed_grads[name], g, rtol=1e-4, atol=1e-5 * scale,
                                       msg=lambda m, name=name: f"{name}: {m}")


def test_collate_shared_prefixes_by_hand():
    """Groups ([1 2]: [3 4], [5]), ([]: [6 7]), ([8]: [9], [10 11 12]).

    Row: 1 2 3 4 5 | 6 7 | 8 9 10 11 12, positions 0 1 2 3 2 | 0 1 | 0 1 1 2 3. Views (L = 4), right-padded
    with their first row: 0 = rows 0 1 2 3; 1 = rows 0 1 4 (+0); 2 = rows 5 6 (+5 5); 3 = rows 7 8 (+7 7);
    4 = rows 7 9 10 11. Sources (view · 4 + column): prefix 1 2 from view 0 (0, 1); 3 4 from view 0 (2, 3);
    5 from view 1 column 2 (6); 6 7 from view 2 (8, 9); prefix 8 from view 3 (12), 9 from view 3 (13);
    10 11 12 from view 4 columns 1-3 (17, 18, 19).
    """
    b = collate_shared_prefixes([([1, 2], [[3, 4], [5]]), ([], [[6, 7]]), ([8], [[9], [10, 11, 12]])])
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 2, 0, 1, 0, 1, 1, 2, 3]]
    assert b["view_index"].tolist() == [[0, 1, 2, 3], [0, 1, 4, 0], [5, 6, 5, 5], [7, 8, 7, 7], [7, 9, 10, 11]]
    assert b["view_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert b["view_source"].tolist() == [0, 1, 2, 3, 6, 8, 9, 12, 13, 17, 18, 19]
    for empty in ([([1], [])], [([], [[]])]):
        with pytest.raises(ValueError, match="every group needs a suffix"):
            collate_shared_prefixes(empty)


def _with_template(tok):
    """A copy of ``tok`` whose chat template adds BOS and role markers to the prompt, the response outside it."""
    tok = copy.deepcopy(tok)
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}")
    return tok


@pytest.mark.parametrize("template", [False, True], ids=["plain", "chat-template"])
def test_packed_views_are_the_sequences_of_encode_each_prompt_once(tiny_tokenizer, template):
    """Prompt A with 2 responses, prompt B with 3: N = |A| + |B| + the 5 responses' tokens (EOS included);
    each view, read through view_index and view_mask, is encode()'s sequence at positions 0, 1, …"""
    tok = _with_template(tiny_tokenizer) if template else tiny_tokenizer
    info = HeadInfo(max_len=256)
    a, b = "Q: 2 + 3 =", "Q: what is 10 * 10 ?"
    texts = [(a, "Answer: 5"), (b, "Answer: 100"), (a, "Answer: 6 or 7"), (b, "no"), (b, "Answer: 1000")]
    batch, rows = pack_texts(TokenCache(tok, info), texts)
    n_prompts = len(encode_prompt(tok, a)) + len(encode_prompt(tok, b))
    assert batch["input_ids"].shape[1] == n_prompts + sum(len(encode_response(tok, r)) for _, r in texts)
    assert rows.tolist() == [0, 2, 1, 3, 4]  # views group by group: A's responses, then B's
    for (p, r), v in zip(texts, rows.tolist()):
        at = batch["view_index"][v][batch["view_mask"][v].bool()]
        ids = encode(tok, info, p, r)[0]
        assert batch["input_ids"][0, at].tolist() == ids
        assert batch["position_ids"][0, at].tolist() == list(range(len(ids)))
    if template:
        assert encode_prompt(tok, a)[0] == tok.bos_token_id


def test_a_sequence_cut_to_max_len_gets_its_own_copy_of_its_prompt(tiny_tokenizer):
    tok = tiny_tokenizer
    info = HeadInfo(max_len=100)
    texts = _texts()
    cut = [len(encode_prompt(tok, p)) + len(encode_response(tok, r)) > info.max_len for p, r in texts]
    assert cut == [False] * 6 + [True]
    batch, rows = pack_texts(TokenCache(tok, info), texts)
    full = [encode(tok, info, p, r)[0] for p, r in texts]
    prompts = {p: len(encode_prompt(tok, p)) for p, _ in texts[:6]}
    # the 3 prompts once, the 6 uncut responses, and the cut sequence whole (its prompt's start cut off)
    assert batch["input_ids"].shape[1] == sum(prompts.values()) + sum(len(f) - prompts[p] for f, (p, _) in
                                                                      zip(full[:6], texts)) + len(full[6])
    for ids, v in zip(full, rows.tolist()):
        at = batch["view_index"][v][batch["view_mask"][v].bool()]
        assert batch["input_ids"][0, at].tolist() == ids
        assert batch["position_ids"][0, at].tolist() == list(range(len(ids)))


@pytest.mark.parametrize("template", [False, True], ids=["plain", "chat-template"])
def test_a_filled_reused_cache_collates_the_batches_of_fresh_encoding(tiny_tokenizer, template):
    """A TokenCache filled with more texts than the batch (in another order) and already read by another batch
    collates, packed and padded, the same tensors as a fresh one (encode() run on the spot, as every step once
    did), and those hold encode()'s sequences: a cut one (max_len = 100) and one response under two prompts
    (the key is the whole text, not the response) among them."""
    tok = _with_template(tiny_tokenizer) if template else tiny_tokenizer
    net = _net(tok)
    texts = _texts() + [(_texts()[1][0], "Answer: 12")]  # "Answer: 12" also answers prompt 0
    assert len(encode(tok, net.info, *texts[6])[0]) == net.info.max_len  # cut
    more = [(p, r + " extra") for p, r in texts[:3]] + [("Q: 1 + 1 =", "Answer: 2")]
    filled = TokenCache(tok, net.info).fill(list(reversed(texts)) + more)
    assert len(filled) == len(texts) + len(more)
    collate_texts(net, filled, more + texts[:2], RewardLayout.packed, "cpu")
    for layout in RewardLayout:
        fresh_batch, fresh_rows = collate_texts(net, TokenCache(tok, net.info), texts, layout, "cpu")
        batch, rows = collate_texts(net, filled, texts, layout, "cpu")
        assert torch.equal(rows, fresh_rows) and batch.keys() == fresh_batch.keys()
        for k, v in batch.items():
            for got, want in zip(v, fresh_batch[k]) if k == "token_views" else [(v, fresh_batch[k])]:
                assert torch.equal(got, want), (layout, k)
        ids = [encode(tok, net.info, p, r)[0] for p, r in texts]
        if layout == RewardLayout.padded:
            assert torch.equal(batch["input_ids"], collate(ids, None, tok.pad_token_id)["input_ids"])
        else:  # each view, through view_index and view_mask, is encode()'s sequence
            index, mask = batch["token_views"][0], batch["view_mask"].bool()
            assert [batch["input_ids"][0, index[v][mask[v]]].tolist() for v in rows.tolist()] == ids
    with pytest.raises(ValueError, match="TokenCache was made for"):  # a cache of another max_len
        collate_texts(net, TokenCache(tok, HeadInfo(max_len=64)), texts, RewardLayout.packed, "cpu")


@pytest.mark.parametrize("family,kv_heads,pooling", [("llama", None, "last"), ("qwen2", None, "last"),
                                                     ("qwen3", 2, "last"), ("gpt2", None, "last"), ("llama", None, "mean")],
                         ids=["llama", "qwen2-bias", "qwen3-qknorm-gqa", "gpt2-absolute-positions", "llama-mean-pooling"])
def test_packed_equals_padded_scores_and_bt_gradients(tiny_tokenizer, family, kv_heads, pooling):
    net = _net(tiny_tokenizer, family, kv_heads, pooling)
    _assert_same(tiny_tokenizer, net, _texts())
    assert net.backbone.config._attn_implementation == "sdpa"  # the backbone's own attention is back


def test_packed_equals_padded_with_odins_length_head(tiny_tokenizer):
    from rlhfkit.recipes.reward import _length_head

    net = _net(tiny_tokenizer)
    net.length_head = _length_head(net, seed=0)
    scores, _ = _scores_and_grads(net, tiny_tokenizer, _texts(), "packed", length_head=True)
    assert scores.shape == (7, 2)
    _assert_same(tiny_tokenizer, net, _texts(), length_head=True)


def test_an_encoder_is_padded_without_a_warning():
    import transformers

    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32)
    net = ScalarModel(transformers.BertModel(cfg), HeadInfo(causal=False, max_len=16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert effective_layout(net, RewardLayout.packed) == RewardLayout.padded


def test_a_sliding_window_or_checkpointed_model_falls_back_to_padded_with_a_warning(tiny_tokenizer):
    tok, texts = tiny_tokenizer, _texts()
    assert effective_layout(_net(tok, "mistral", sliding_window=None), RewardLayout.packed) == RewardLayout.packed
    with pytest.warns(UserWarning, match="falls back to padded"):
        assert effective_layout(_net(tok, "mistral", sliding_window=8), RewardLayout.packed) == RewardLayout.padded
    net = _net(tok)
    ref, ref_grads = _scores_and_grads(net, tok, texts, "padded")
    net.backbone.activation_checkpointing_enable()
    net.train()  # transformers checkpoints only in training mode (the tiny model has no dropout)
    with pytest.warns(UserWarning, match="falls back to padded"):
        batch, rows = collate_texts(net, TokenCache(tok, net.info), texts, RewardLayout.packed, "cpu")
    assert "attention_mask" in batch and torch.equal(rows, torch.arange(len(texts)))
    torch.testing.assert_close(net(**batch)[rows].detach(), ref, rtol=1e-5, atol=1e-5)
    assert effective_layout(net, RewardLayout.padded) == RewardLayout.padded


class _ListLog:
    def __init__(self):
        self.rows = []

    def write(self, row):
        self.rows.append(row)


def _spy_on_tokenizing(monkeypatch) -> tuple[Counter, Counter, list]:
    """(texts given to encode(), prompts given to encode_prompt(), whether each of the recipe's collations
    packed), as a TokenCache calls the two and recipes.reward calls collate_texts, from now on."""
    from rlhfkit.recipes import reward

    encoded, prompted, packed = Counter(), Counter(), []
    real_encode, real_encode_prompt = reward_layout.encode, reward_layout.encode_prompt
    real_collate = reward.collate_texts

    def counted_encode(tokenizer, info, prompt, response):
        encoded[(prompt, response)] += 1
        return real_encode(tokenizer, info, prompt, response)

    def counted_encode_prompt(tokenizer, prompt):
        prompted[prompt] += 1
        return real_encode_prompt(tokenizer, prompt)

    def spied_collate(*args, **kwargs):
        out = real_collate(*args, **kwargs)
        packed.append("token_views" in out[0])
        return out

    monkeypatch.setattr(reward_layout, "encode", counted_encode)
    monkeypatch.setattr(reward_layout, "encode_prompt", counted_encode_prompt)
    monkeypatch.setattr(reward, "collate_texts", spied_collate)
    return encoded, prompted, packed


def test_train_rm_gives_the_same_loss_gradients_and_scores_in_either_layout(tiny_lm_dir, tmp_path, monkeypatch):
    """Two steps of train_rm (rankings of 3 and pairs, ODIN on; the batch is every ranking, so step 2 is epoch 2)
    record the same losses and gradients packed as padded, and pair_scores of the results agree; the packed run
    did pack (a spy on the collation). Each run tokenizes each distinct text and prompt once (encode and
    encode_prompt counted); a packed run that tokenizes every text at every step instead, as before the
    TokenCache, records exactly the same losses and gradients."""
    import json

    from accelerate import Accelerator

    from rlhfkit import training
    from rlhfkit.data.preferences import load_pairs
    from rlhfkit.recipes.reward import RewardConfig, pair_scores, train_rm

    rows = []
    for i in range(4):
        rows.append({"prompt": f"Q{i}: 2 + {i} =", "responses": [f"Answer: {i + j}" + " ok" * j for j in range(3)],
                     "ranking": [2, 0, 1]})
        rows.append({"prompt": f"P{i}: 3 * {i} =", "chosen": f"Answer: {3 * i}", "rejected": "Answer: 7" + " no" * i})
    path = tmp_path / "rankings.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pair_set = load_pairs(path)
    texts = {(p.prompt, r) for p in pair_set.pairs for r in (p.chosen, p.rejected)}

    recorded = []

    class Recorder(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(list(params), {"lr": 0.0})

        def step(self, closure=None):
            recorded.append([p.grad.clone() for g in self.param_groups for p in g["params"]])

    monkeypatch.setattr(training, "make_optimizer_and_scheduler",
                        lambda model, cfg, total: (opt := Recorder(p for p in model.parameters() if p.requires_grad),
                                                   torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)))
    encoded, prompted, packed_calls = _spy_on_tokenizing(monkeypatch)
    losses, grads, scores = {}, {}, {}
    for arm in ("padded", "packed", "packed, tokenized every step"):
        layout, every_step = arm.split(",")[0], arm.endswith("every step")
        log = _ListLog()
        cfg = RewardConfig(batch_size=8, max_steps=2, grad_clip=0.0, warmup_steps=0, center_coef=0.1, max_len=64,
                           log_every=1, length_decorrelation=0.5, layout=layout)
        for spy in (packed_calls, encoded, prompted, recorded):
            spy.clear()
        with monkeypatch.context() as m:
            if every_step:  # as before the cache: no fill, encode() and encode_prompt() at every request
                m.setattr(TokenCache, "fill", lambda self, texts: self)
                m.setattr(TokenCache, "encode",
                          lambda self, p, r: reward_layout.encode(self.tokenizer, self.info, p, r))
                m.setattr(TokenCache, "prompt", lambda self, p: reward_layout.encode_prompt(self.tokenizer, p))
            net, tok, _ = train_rm(cfg, tiny_lm_dir, pair_set, Accelerator(cpu=True), log)
        assert packed_calls == [layout == "packed"] * 2
        assert set(encoded) == texts and set(prompted) == {p.prompt for p in pair_set.pairs}
        if every_step:  # each text once a step (once in a batch); each prompt once for each of its texts
            assert set(encoded.values()) == {2} and min(prompted.values()) >= 2
        else:
            assert set(encoded.values()) == {1} == set(prompted.values())
        losses[arm] = [r["loss"] for r in log.rows if "loss" in r]
        grads[arm] = list(recorded)
        if not every_step:
            scores[arm] = pair_scores(net, tok, pair_set.pairs, 5, "cpu", layout)
    assert len(losses["packed"]) == 2 == len(grads["packed"])
    assert losses["packed"] == pytest.approx(losses["padded"], rel=1e-5)
    for got, want in zip(grads["packed"], grads["padded"]):
        scale = max(g.abs().max().item() for g in want)
        assert scale > 0
        assert max((a - b).abs().max().item() for a, b in zip(got, want)) / scale < 1e-5
    torch.testing.assert_close(torch.tensor(scores["packed"]), torch.tensor(scores["padded"]), rtol=1e-5, atol=1e-5)
    # the same ids, so the same computation: equal to the bit
    assert losses["packed, tokenized every step"] == losses["packed"]
    assert all(torch.equal(a, b) for got, want in zip(grads["packed, tokenized every step"], grads["packed"])
               for a, b in zip(got, want))


@pytest.mark.parametrize("kind", ["orm", "cost"])
def test_orm_and_cost_training_tokenize_each_text_once(tiny_lm_dir, monkeypatch, kind):
    """Two steps of train_orm / train_cost over the same batch (two epochs) encode each distinct text and prompt
    once (encode and encode_prompt counted), and both steps collate packed batches from them."""
    from accelerate import Accelerator

    from rlhfkit.data.preferences import SafetyRecord, StepRecord, safety_pairs
    from rlhfkit.recipes.reward import RewardConfig, train_cost, train_orm

    prompts = [f"Q{i}: 2 + {i} =" for i in range(4)]
    if kind == "orm":
        units = [StepRecord(q, (f"Answer: {2 + i + j}" + " ok" * j,), (None,), correct=j == 0)
                 for i, q in enumerate(prompts) for j in range(2)]
        texts = {(r.prompt, r.completion) for r in units}
    else:
        units = safety_pairs([SafetyRecord(q, f"Answer: {2 + i + j}" + " no" * j, is_safe=j == 0)
                              for i, q in enumerate(prompts) for j in range(2)])
        texts = {(x.prompt, x.response) for pair in units for x in pair}
    encoded, prompted, packed_calls = _spy_on_tokenizing(monkeypatch)
    log = _ListLog()
    cfg = RewardConfig(batch_size=len(units), max_steps=2, warmup_steps=0, max_len=64, log_every=1)
    (train_orm if kind == "orm" else train_cost)(cfg, tiny_lm_dir, units, Accelerator(cpu=True), log)
    assert packed_calls == [True, True] and len([r for r in log.rows if "loss" in r]) == 2
    assert set(encoded) == texts and set(encoded.values()) == {1}
    assert set(prompted) == set(prompts) and set(prompted.values()) == {1}


def test_packed_equals_padded_under_lora(tiny_lm_dir, tiny_tokenizer):
    """A LoRA backbone (a peft model around the base) packs too: view attention is set on the adapted base."""
    from rlhfkit.models.trainable import LoRAConfig
    from rlhfkit.recipes.reward import RewardConfig, _build

    net, tok = _build(RewardConfig(lora=LoRAConfig(r=4), max_len=100), tiny_lm_dir, "reward")
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # a trained-looking adapter, so lora_A gets a gradient too
    assert effective_layout(net.eval(), RewardLayout.packed) == RewardLayout.packed
    _assert_same(tok, net, _texts())
