"""PPO-ptx (``rlhfkit.ptx``): γ × the demonstrations' mean NLL in every RL optimizer step."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhfkit.data.collate import IGNORE, TokenizedExample, collate_sft
from rlhfkit.ptx import PtxTerm
from rlhfkit.training import token_loss_sum


class _Acc:
    device = torch.device("cpu")

    @staticmethod
    def backward(loss):
        loss.backward()


def _model(zero_head: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False))
    if zero_head:
        torch.nn.init.zeros_(m.lm_head.weight)
    return m


# 5 demonstrations: prompt tokens carry IGNORE labels; loss tokens 3, 2, 4, 1, 3 (the first label never counts).
EXAMPLES = [TokenizedExample(list(range(10 + i, 10 + i + 4 + i)), [IGNORE] * (1 + i // 2) + list(range(10 + i + 1 + i // 2, 10 + i + 4 + i)))
            for i in range(5)]


def _grad(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_uniform_logits_cost_log_v_per_token():
    """A zero output head gives every token probability 1/V: the mean NLL is log 300 = 5.70378, whatever is drawn."""
    term = PtxTerm(EXAMPLES, coef=2.0, batch_size=4, pad_id=0)
    nll = term.backward(_model(zero_head=True), _Acc(), torch.Generator().manual_seed(0), rank=0, world=1)
    assert nll.item() == pytest.approx(math.log(300), abs=1e-5)


def test_gradient_is_gamma_times_the_mean_nll_and_two_shards_average_to_it():
    """world 1: the gradient of γ · Σ NLL / (the draw's loss tokens). world 2: each rank runs its half with
    weight 2 (DDP then averages), the two gradients' mean and the two parts' sum equal world 1's."""
    gamma = 0.5
    model = _model()
    nll1 = PtxTerm(EXAMPLES, gamma, 4, 0).backward(model, _Acc(), torch.Generator().manual_seed(3), 0, 1)
    g1 = _grad(model)
    draw = torch.randint(len(EXAMPLES), (4,), generator=torch.Generator().manual_seed(3)).tolist()
    model.zero_grad()
    batch = collate_sft([EXAMPLES[i] for i in draw], 0)
    direct = token_loss_sum(model, batch) / sum(EXAMPLES[i].n_loss_tokens for i in draw)
    (gamma * direct).backward()
    assert nll1.item() == pytest.approx(direct.item(), rel=1e-6)
    assert torch.allclose(g1, _grad(model), atol=1e-7)
    parts, grads = [], []
    for rank in (0, 1):
        model.zero_grad()
        parts.append(PtxTerm(EXAMPLES, gamma, 4, 0).backward(model, _Acc(), torch.Generator().manual_seed(3), rank, 2))
        grads.append(_grad(model))
    assert sum(parts).item() == pytest.approx(nll1.item(), rel=1e-6)
    assert torch.allclose((grads[0] + grads[1]) / 2, g1, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by the 3 processes"):
        PtxTerm(EXAMPLES, gamma, 4, 0).backward(model, _Acc(), torch.Generator(), 0, 3)


def test_ppo_config_checks_ptx_fields():
    from rlhfkit.recipes.ppo import PPOConfig

    with pytest.raises(ValueError, match="ptx_coef"):
        PPOConfig(ptx_coef=-1.0)
    with pytest.raises(ValueError, match="ptx_batch_size"):
        PPOConfig(ptx_batch_size=0)


def test_ppo_with_ptx_logs_the_nll_and_refuses_a_bad_demonstration_before_loading_models(tmp_path, tiny_lm_dir, monkeypatch):
    from accelerate import Accelerator

    from rlhfkit.data.loading import DataError
    from rlhfkit.io import read_jsonl_plain
    from rlhfkit.recipes import ppo
    from rlhfkit.stage import StageContext
    from test_ppo import _tiny_cfg, _write_prompts

    _write_prompts(tmp_path)
    demos = [{"prompt": "Question: Ana has 5 eggs. She buys 4 more eggs. How many eggs does Ana have now?\n",
              "response": "5 + 4 = 9\nAnswer: 9"}] * 6
    (tmp_path / "data" / "sft.jsonl").write_text("".join(json.dumps(d) + "\n" for d in demos))
    stage = tmp_path / "ppo.partial"
    stage.mkdir()
    cfg = _tiny_cfg(tiny_lm_dir, total_steps=1, save_every=0, ptx_coef=1.0, ptx_batch_size=2)
    ppo.run(cfg, StageContext(tmp_path, stage, "ppo", Accelerator(cpu=True)))
    row = read_jsonl_plain(stage / "log.jsonl")[0]
    assert math.isfinite(row["ptx_nll"]) and row["ptx_nll"] > 0
    # A record without a response: the error names file and line, and no model was loaded.
    (tmp_path / "data" / "bad.jsonl").write_text(json.dumps(demos[0]) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    loads = []
    monkeypatch.setattr(ppo, "load_causal_lm", lambda *a, **k: loads.append(1))
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        ppo.run(dataclasses.replace(cfg, ptx_data=str(tmp_path / "data" / "bad.jsonl")),
                StageContext(tmp_path, tmp_path / "x.partial", "ppo", Accelerator(cpu=True)))
    assert not loads



def test_a_pretraining_corpus_is_packed_as_the_pretrain_stage_packs_it_with_every_token_a_loss_token(tmp_path, tiny_lm_dir):
    """InstructGPT's D is the pretraining distribution. Records with ``text`` (or a .txt file) load as a corpus:
    the blocks are ``pack_documents``' (the pretrain stage's packing), collated with ``collate_packed``, and the
    term's NLL is token_loss_sum over the drawn blocks / their loss tokens, as for demonstrations. Records with
    ``prompt`` load as demonstrations; a block longer than the context is refused."""
    from rlhfkit.data.collate import collate_packed, pack_documents
    from rlhfkit.models.loading import load_tokenizer
    from rlhfkit.ptx import is_text_corpus, load_ptx_examples

    tok = load_tokenizer(tiny_lm_dir)
    docs = ["3 + 4 = 7", "Tom has 5 pens. He buys 2 more pens.", "12 - 5 = 7\n7 * 2 = 14"]
    corpus = tmp_path / "pretrain.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "corpus.txt").write_text("\n\n".join(docs))
    demos = tmp_path / "sft.jsonl"
    demos.write_text(json.dumps({"prompt": "Question: 3 + 4?\n", "response": "3 + 4 = 7\nAnswer: 7"}) + "\n")
    assert is_text_corpus(corpus) and is_text_corpus(tmp_path / "corpus.txt") and not is_text_corpus(demos)
    blocks, collate = load_ptx_examples(corpus, tok, context=256, block_size=16)
    assert collate is collate_packed
    assert [b.input_ids for b in blocks] == [b.input_ids for b in pack_documents(tok, docs, 16)]
    assert sum(b.n_loss_tokens for b in blocks) > 0 and all(x != IGNORE for b in blocks for x in b.labels[1:2])
    from_txt, _ = load_ptx_examples(tmp_path / "corpus.txt", tok, context=256, block_size=16)
    assert [b.input_ids for b in from_txt] == [b.input_ids for b in blocks]
    examples, collate = load_ptx_examples(demos, tok, context=256, block_size=16)
    assert collate is collate_sft and len(examples) == 1 and examples[0].labels[0] == IGNORE
    with pytest.raises(ValueError, match="ptx_block_size 512 exceeds the policy's context 256"):
        load_ptx_examples(corpus, tok, context=256, block_size=512)
    model = _model()
    term = PtxTerm(blocks, 1.0, 2, tok.pad_token_id, collate_packed)
    nll = term.backward(model, _Acc(), torch.Generator().manual_seed(1), 0, 1)
    draw = torch.randint(len(blocks), (2,), generator=torch.Generator().manual_seed(1)).tolist()
    direct = token_loss_sum(model, collate_packed([blocks[i] for i in draw], tok.pad_token_id))
    assert nll.item() == pytest.approx(direct.item() / sum(blocks[i].n_loss_tokens for i in draw), rel=1e-6)
