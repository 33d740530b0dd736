"""DPO's pair layouts: packed (one unpadded row, view attention) against the plain concatenated forward.

The packed layout is a fast path, so it must be the same function as the plain one: the same
sequence log-probs and the same gradients (to float32 rounding), on several architectures, with
prompts and responses of different lengths, chosen longer than rejected and the reverse.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from rlhfkit.data.pairs import TokenizedPair
from rlhfkit.models.sequence_logps import PairLayout


def _model(family: str, kv_heads: int | None = None, vocab: int = 300):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = LlamaConfig if family == "llama" else Qwen2Config
    cfg = cls(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=kv_heads or 4, max_position_embeddings=256, tie_word_embeddings=family == "llama",
              attn_implementation="sdpa")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _pairs(tok, n=6):
    from rlhfkit.data.pairs import tokenize_pairs
    from rlhfkit.tasks.arith import format_prompt, gold_response, make_problems

    probs = make_problems(n, seed=5, unanswerable_frac=0.25)
    Pair = dataclasses.make_dataclass("Pair", ["prompt", "chosen", "rejected"])
    # odd pairs: rejected longer than chosen; even pairs: shorter
    raw = [Pair(format_prompt(p), gold_response(p), "Answer: 1" + "0" * i + (" and more words" * 4 if i % 2 else ""))
           for i, p in enumerate(probs)]
    pairs = tokenize_pairs(tok, raw, max_len=250)
    assert len({len(p.prompt_ids) for p in pairs}) > 1
    assert any(len(p.rejected_ids) > len(p.chosen_ids) for p in pairs)
    assert any(len(p.rejected_ids) < len(p.chosen_ids) for p in pairs)
    return pairs


def _logps_and_grads(model, pairs, pad_id, layout):
    from rlhfkit.models.sequence_logps import pair_forward

    model.zero_grad()
    logps, n = pair_forward(model, pairs, pad_id, "cpu", layout)
    (logps * torch.linspace(-1, 1, len(logps))).sum().backward()  # a different weight per row: rows can't swap
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    return logps.detach(), n, grads


def test_packed_collate_by_hand():
    """Pair 0: prompt [1 2], chosen [3 4], rejected [5]; pair 1: prompt [6], chosen [7], rejected [8 9 10].

    Row: 1 2 3 4 5 | 6 7 8 9 10 (positions 0 1 2 3 2 | 0 1 1 2 3). Views (L = 4):
    0 = prompt 0 + chosen 0 = rows 0 1 2 3; 1 = prompt 1 + chosen 1 = rows 5 6, padded with 5;
    2 = prompt 0 + rejected 0 = rows 0 1 4, padded with 0; 3 = prompt 1 + rejected 1 = rows 5 7 8 9.
    Sources (view · 4 + column): tokens 0-3 from view 0; token 4 (rejected) from view 2 column 2 = 10;
    tokens 5, 6 from view 1 = 4, 5; tokens 7-9 from view 3 columns 1-3 = 13 14 15.
    Predictors: chosen 0's tokens by rows 1, 2; rejected 0's by row 1 (the prompt's end, not chosen's);
    chosen 1's by row 5; rejected 1's by rows 5, 7, 8.
    """
    from rlhfkit.data.pairs import collate_pairs_packed

    b = collate_pairs_packed([TokenizedPair([1, 2], [3, 4], [5]), TokenizedPair([6], [7], [8, 9, 10])])
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 2, 0, 1, 1, 2, 3]]
    assert b["view_index"].tolist() == [[0, 1, 2, 3], [5, 6, 5, 5], [0, 1, 4, 0], [5, 7, 8, 9]]
    assert b["view_source"].tolist() == [0, 1, 2, 3, 10, 4, 5, 13, 14, 15]
    assert b["predictor"].tolist() == [[1, 2, 1, 5, 5, 7, 8]]
    assert b["labels"].tolist() == [3, 4, 5, 7, 8, 9, 10]
    assert b["label_view"].tolist() == [0, 0, 2, 1, 3, 3, 3]


@pytest.mark.parametrize("family,kv_heads", [("llama", None), ("qwen2", None), ("llama", 2)],
                         ids=["llama", "qwen2-bias-untied", "llama-gqa"])
def test_packed_equals_concatenated_values_and_gradients(tiny_tokenizer, family, kv_heads):
    tok = tiny_tokenizer
    model = _model(family, kv_heads, vocab=len(tok))
    pairs = _pairs(tok)
    ref_logps, ref_n, ref_grads = _logps_and_grads(model, pairs, tok.pad_token_id, PairLayout.concatenated)
    logps, n, grads = _logps_and_grads(model, pairs, tok.pad_token_id, PairLayout.packed)
    assert torch.equal(n, ref_n)
    # float32 rounding only: sums of ~30 log-probs of magnitude ~6 agree to ~1e-5 relative
    torch.testing.assert_close(logps, ref_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads, ref_grads, rtol=1e-4, atol=1e-5)
    assert model.config._attn_implementation == "sdpa"  # the model's own attention is back


def test_packed_reference_logps_equal_concatenated(tiny_tokenizer):
    from rlhfkit.models.sequence_logps import precompute_logps

    tok = tiny_tokenizer
    model = _model("llama", vocab=len(tok))
    pairs = _pairs(tok, 7)
    ref = precompute_logps(model, pairs, tok.pad_token_id, 3, "cpu", PairLayout.concatenated)  # batches 3, 3, 1
    got = precompute_logps(model, pairs, tok.pad_token_id, 3, "cpu", PairLayout.packed)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-5)


def test_view_attention_restores_the_models_attention_after_an_error():
    from rlhfkit.models.view_attention import view_attention

    model = _model("llama")
    with pytest.raises(RuntimeError, match="boom"):
        with view_attention(model):
            assert model.config._attn_implementation != "sdpa"
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_packed_falls_back_to_concatenated_under_activation_checkpointing(tiny_tokenizer):
    """A checkpointed layer re-runs its forward in backward, after view attention is switched off: not allowed."""
    tok = tiny_tokenizer
    model = _model("llama", vocab=len(tok))
    pairs = _pairs(tok, 3)
    ref_logps, _, ref_grads = _logps_and_grads(model, pairs, tok.pad_token_id, PairLayout.concatenated)
    model.activation_checkpointing_enable()
    model.train()  # transformers checkpoints only in training mode
    with pytest.warns(UserWarning, match="falls back to concatenated"):
        logps, _, grads = _logps_and_grads(model, pairs, tok.pad_token_id, PairLayout.packed)
    torch.testing.assert_close(logps, ref_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads, ref_grads, rtol=1e-4, atol=1e-5)


def test_view_attention_refuses_a_sliding_window_shorter_than_a_view():
    from rlhfkit.models.view_attention import view_attention_forward

    q = torch.zeros(1, 2, 5, 4)
    views = (torch.tensor([[0, 1, 2, 3, 4]]), torch.arange(5))
    view_attention_forward(None, q, q, q, None, token_views=views, sliding_window=5)  # covers the view: fine
    with pytest.raises(ValueError, match="sliding_window"):
        view_attention_forward(None, q, q, q, None, token_views=views, sliding_window=4)


def test_a_sliding_window_model_is_not_offered_view_attention():
    from transformers import AutoModelForCausalLM, MistralConfig

    from rlhfkit.models.view_attention import supports_view_attention

    def mistral(window):
        cfg = MistralConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, sliding_window=window)
        return AutoModelForCausalLM.from_config(cfg)

    assert supports_view_attention(mistral(None))
    assert not supports_view_attention(mistral(8))
    assert supports_view_attention(_model("qwen2"))  # Qwen2 carries a window size but does not use it


def test_a_soft_capped_model_is_not_offered_view_attention():
    from rlhfkit.models.view_attention import supports_view_attention

    model = _model("llama")
    assert supports_view_attention(model)
    model.config.attn_logit_softcapping = 50.0  # as Gemma-2 sets it
    assert not supports_view_attention(model)
