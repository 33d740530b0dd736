"""DPO recipe, DNO (Algorithm 2) pieces, the pairwise preference model and the intransitive judge.

The losses themselves (dpo_loss, IPO, label smoothing, dno_loss, dno_soft_loss) have their
hand-computed tests in test_losses.py; this file tests what the recipes add around them.
"""
from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from rlhfkit.recipes.dno import (DNOPair, average_win_rates, mix_pairs, select_pairs, soft_pairs,
                                 win_rate_matrix)
from rlhfkit.stage import StageContext


def _sig(x):
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------- DNO: ranking, margin filter, mixing

class ShorterWins:
    """A toy preference function: the shorter text wins surely, equal lengths tie."""

    name = "shorter"

    def prob(self, items):
        return [1.0 if len(a) < len(b) else 0.0 if len(a) > len(b) else 0.5 for _, a, b in items]


def test_win_rate_matrix_and_average_win_rates_by_hand():
    # lengths 1, 3, 2 and one unfinished (it loses to every finished response, ties itself)
    w = win_rate_matrix(ShorterWins(), "p", ["a", "ccc", "bb", "d"], [True, True, True, False])
    assert w == [[0.5, 1.0, 1.0, 1.0],
                 [0.0, 0.5, 0.0, 1.0],
                 [0.0, 1.0, 0.5, 1.0],
                 [0.0, 0.0, 0.0, 0.5]]
    # averages over the 3 others: (1+1+1)/3, (0+0+1)/3, (0+1+1)/3, 0
    assert average_win_rates(w) == pytest.approx([1.0, 1 / 3, 2 / 3, 0.0], abs=1e-12)


def test_margin_filter_by_hand():
    responses, rates = ["x", "y", "z"], [0.8, 0.2, 0.5]
    # best vs worst: gap 0.8 − 0.2 = 0.6
    kept = select_pairs("p", responses, rates, "best_worst", min_margin=0.6 - 1e-9)
    assert [(q.chosen, q.rejected) for q in kept] == [("x", "y")]
    assert select_pairs("p", responses, rates, "best_worst", min_margin=0.61) == []
    # all pairs: gaps x>y 0.6, x>z 0.3, z>y 0.3
    assert {(q.chosen, q.rejected) for q in select_pairs("p", responses, rates, "all", 0.25)} == {("x", "y"), ("x", "z"), ("z", "y")}
    assert {(q.chosen, q.rejected) for q in select_pairs("p", responses, rates, "all", 0.35)} == {("x", "y")}
    # a zero gap is never a pair, even with min_margin 0; identical texts neither
    assert select_pairs("p", ["x", "y"], [0.5, 0.5], "best_worst", 0.0) == []
    assert select_pairs("p", ["x", "x"], [1.0, 0.0], "best_worst", 0.0) == []


def test_soft_pairs_targets_by_hand():
    pairs = soft_pairs("p", ["a", "b", "c"], [0.75, 0.25, 0.5])
    got = {(q.chosen, q.rejected): q.target for q in pairs}
    assert got == pytest.approx({("a", "b"): _sig(0.5), ("a", "c"): _sig(0.25), ("b", "c"): _sig(-0.25)})


def test_dno_pair_loss_with_sft_term_by_hand():
    """Chosen: Σ log π = −2 over 4 tokens, π_t gave −2.5; rejected: −3, π_t gave −2.5; η = 0.1.

    contrastive: −log σ(0.1·((−2 + 2.5) − (−3 + 2.5))) = −log σ(0.1) = ln(1 + e^−0.1) = 0.644397;
    SFT term: per-token NLL of the chosen = 2 / 4 = 0.5; with sft_coef 2: 0.644397 + 2·0.5 = 1.644397.
    """
    from rlhfkit.recipes.dno import DNOConfig, dno_pair_loss

    args = (torch.tensor([-2.0]), torch.tensor([-3.0]), torch.tensor([-2.5]), torch.tensor([-2.5]),
            (torch.tensor([4]), torch.tensor([3])), torch.tensor([0]))
    plain, w, _ = dno_pair_loss(DNOConfig(eta=0.1), torch.ones(1))(*args)
    assert plain.item() == pytest.approx(0.644397, abs=1e-6) and w == 1.0
    with_sft, _, m = dno_pair_loss(DNOConfig(eta=0.1, sft_coef=2.0), torch.ones(1))(*args)
    assert with_sft.item() == pytest.approx(1.644397, abs=1e-6) and m["sft_nll"] == pytest.approx(0.5)


def test_mix_pairs_exact_counts_and_sources():
    def it(t, n):
        return [DNOPair(f"p{t}-{i}", "c", "r", iteration=t) for i in range(n)]

    history = [it(1, 10), it(2, 8)]  # oldest first
    current = it(3, 6)
    mixed = mix_pairs(current, history, (0.5, 0.3), random.Random(0))
    # all of t=3, round(0.5·8) = 4 of t=2 (t−1), round(0.3·10) = 3 of t=1 (t−2)
    by_t = {t: [q for q in mixed if q.iteration == t] for t in (1, 2, 3)}
    assert [len(by_t[t]) for t in (1, 2, 3)] == [3, 4, 6]
    assert by_t[3] == current
    assert len({q.prompt for q in mixed}) == len(mixed)  # drawn without replacement
    assert all(q in history[0] for q in by_t[1]) and all(q in history[1] for q in by_t[2])
    # fraction 0 adds nothing; a fraction beyond the available history is ignored
    assert mix_pairs(current, history[:1], (0.0, 1.0), random.Random(0)) == current


# ---------------------------------------------------------------- DPO recipe pieces

@pytest.fixture(scope="module")
def tiny_lm(tiny_lm_dir):
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer

    return load_causal_lm(tiny_lm_dir), load_tokenizer(tiny_lm_dir)


def _pairs(tok, n=8):
    from rlhfkit.data.pairs import tokenize_pairs
    from rlhfkit.tasks.arith import format_prompt, gold_response, make_problems

    probs = make_problems(n, seed=3, unanswerable_frac=0.25)
    Pair = dataclasses.make_dataclass("Pair", ["prompt", "chosen", "rejected"])
    raw = [Pair(format_prompt(p), gold_response(p), "Answer: 1" + "0" * (i % 3)) for i, p in enumerate(probs)]
    return tokenize_pairs(tok, raw, max_len=200)


def test_one_concatenated_forward_equals_separate_forwards(tiny_lm):
    from rlhfkit.data.pairs import collate_pairs
    from rlhfkit.models.sequence_logps import sequence_logps

    model, tok = tiny_lm
    pairs = _pairs(tok, 4)
    both, _ = sequence_logps(model, collate_pairs(pairs, tok.pad_token_id))
    for i, p in enumerate(pairs):
        for row, resp in ((i, p.chosen_ids), (len(pairs) + i, p.rejected_ids)):
            ids = torch.tensor([p.prompt_ids + resp])
            logits = model(input_ids=ids).logits[0, :-1]
            lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            assert both[row].item() == pytest.approx(lp[len(p.prompt_ids) - 1:].sum().item(), abs=1e-4)


def test_shared_prompt_forward_equals_concatenated_forward_values_and_gradients(tiny_lm):
    from rlhfkit.models.sequence_logps import PairLayout, pair_forward

    model, tok = tiny_lm
    pairs = _pairs(tok, 5)  # prompts of different lengths: left padding is exercised
    assert len({len(p.prompt_ids) for p in pairs}) > 1
    grads = []
    for share in (False, True):  # the packed layout has its own tests in test_dpo_layouts.py
        model.zero_grad()
        logps, n = pair_forward(model, pairs, tok.pad_token_id, "cpu",
                                PairLayout.prompt_cache if share else PairLayout.concatenated)
        (logps * torch.linspace(-1, 1, len(logps))).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        if share:
            assert torch.allclose(logps, ref_logps, atol=1e-4) and torch.equal(n, ref_n)
        else:
            ref_logps, ref_n = logps.detach(), n
    assert torch.allclose(grads[0], grads[1], atol=1e-4, rtol=1e-3)
    model.zero_grad()


def test_dpo_reference_computed_once_and_one_forward_per_step(tiny_lm_dir, tmp_path, monkeypatch):
    from accelerate import Accelerator

    from rlhfkit.io import JsonlLog
    from rlhfkit.preference_losses import DPOLossType
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer
    from rlhfkit.models.sequence_logps import precompute_logps
    from rlhfkit.pair_training import train_on_pairs
    from rlhfkit.recipes import dpo

    tok = load_tokenizer(tiny_lm_dir)
    pairs = _pairs(tok, 8)
    model = load_causal_lm(tiny_lm_dir)
    calls = {"forward": 0}
    model.register_forward_hook(lambda *a: calls.__setitem__("forward", calls["forward"] + 1))
    ref = precompute_logps(model, pairs, tok.pad_token_id, batch_size=8, device="cpu")
    assert calls["forward"] == 1  # 8 pairs, one batch
    cfg = dpo.DPOConfig(batch_size=4, max_steps=3, loss_type=DPOLossType.sigmoid, beta=0.5, lr=1e-3, log_every=1, sft_coef=0.1)
    weights = torch.ones(len(pairs))
    log = JsonlLog(tmp_path / "log.jsonl")
    m = train_on_pairs(model, pairs, ref, dpo.dpo_pair_loss(cfg, weights), cfg, Accelerator(cpu=True), log,
                       tok.pad_token_id)
    log.close()
    assert calls["forward"] == 1 + 3  # no reference forward during training; one pass per step for both sides
    assert m["train_pairs"] == 12 and "final_sft_nll" in m
    # the first step's policy equals its reference: implicit rewards 0, loss log 2 (+ the SFT term)
    first = [__import__("json").loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()][0]
    assert first["chosen_reward"] == pytest.approx(0.0, abs=1e-5)
    assert first["loss"] == pytest.approx(math.log(2) + 0.1 * first["sft_nll"], abs=1e-4)


def test_best_worst_from_rankings(tmp_path):
    import json

    from rlhfkit.data.preferences import load_pairs
    from rlhfkit.recipes.dpo import select_ranking_pairs

    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps({"prompt": "q", "responses": ["a", "b", "c", "b"], "ranking": [2, 0, 1, 3]}) + "\n"
                 + json.dumps({"prompt": "q2", "chosen": "x", "rejected": "x"}) + "\n")
    ps = load_pairs(f)
    bw = select_ranking_pairs(ps, "best_worst")
    assert [(p.chosen, p.rejected, p.weight) for p in bw] == [("c", "b", 1.0)]  # x/x dropped: identical
    allp = select_ranking_pairs(ps, "all")
    assert len(allp) == 5 and all(p.weight == pytest.approx(1 / 6) for p in allp)  # b/b dropped from the 6


# ---------------------------------------------------------------- DNO: the reference is the previous iterate

@pytest.mark.parametrize("lora", [0, 4], ids=["full", "lora"])
def test_dno_reference_is_the_previous_iterate_not_the_sft_model(tiny_lm_dir, tmp_path, monkeypatch, lora):
    """Under LoRA too: the adapter carries over between iterations and each iterate's merged model is saved."""
    import json

    from rlhfkit.models.trainable import LoRAConfig

    from accelerate import Accelerator

    import rlhfkit.generation as generation
    from rlhfkit.io import JsonlLog
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer
    from rlhfkit.models.sequence_logps import precompute_logps
    from rlhfkit.recipes import dno
    from rlhfkit.tasks.arith import format_prompt, make_problems

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": format_prompt(p)}) + "\n" for p in make_problems(20, 5, 0.2)))
    real_sample = generation.sample
    # A random tiny model rarely emits EOS; mark samples finished so the toy judge compares them.
    monkeypatch.setattr(dno, "sample", lambda *a, **k: [dataclasses.replace(s, finished=True) for s in real_sample(*a, **k)])
    seen = []
    real_ref = dno.reference_logps

    def recording(model, pairs, *a):
        out = real_ref(model, pairs, *a)
        seen.append((pairs, out))
        return out

    monkeypatch.setattr(dno, "reference_logps", recording)
    cfg = dno.DNOConfig(iterations=2, prompts_per_iteration=8, samples_per_prompt=3, n_validation=4, batch_size=4,
                        epochs=1.0, lr=5e-3, eta=1.0, judge="unused", mix_fractions=(1.0,),
                        sampling=generation.SamplingConfig(max_new_tokens=6, temperature=1.0), lora=LoRAConfig(r=lora))
    log = JsonlLog(tmp_path / "log.jsonl")
    cfg = dataclasses.replace(cfg, model=str(tiny_lm_dir), prompts=str(prompts))
    result = dno.run(cfg, StageContext(tmp_path, tmp_path / "dno", "dno", Accelerator(cpu=True), log), pf=ShorterWins())
    log.close()
    assert len(seen) == 2 and set(result["iterations"]) == {"dno_1", "dno_2"}
    tok = load_tokenizer(tiny_lm_dir)
    pairs2, ref2 = seen[1]
    prev = precompute_logps(load_causal_lm(tmp_path / "dno" / "dno_1" / "model"), pairs2, tok.pad_token_id, 64, "cpu")
    sft = precompute_logps(load_causal_lm(tiny_lm_dir), pairs2, tok.pad_token_id, 64, "cpu")
    assert torch.allclose(ref2["chosen"], prev["chosen"], atol=1e-5)
    assert torch.allclose(ref2["rejected"], prev["rejected"], atol=1e-5)
    assert (ref2["chosen"] - sft["chosen"]).abs().max() > 1e-2  # training moved π: SFT would differ
    # iteration 2 trained on its own pairs plus all (fraction 1.0) of iteration 1's
    n1 = result["iterations"]["dno_1"]["n_new_pairs"]
    assert result["iterations"]["dno_2"]["n_train_pairs"] == result["iterations"]["dno_2"]["n_new_pairs"] + n1
    assert (tmp_path / "dno" / "model" / "config.json").exists()  # the selected iterate
    assert (tmp_path / "dno" / "dno_1" / "adapter" / "adapter_config.json").exists() == bool(lora)


# ---------------------------------------------------------------- the pairwise preference model

def test_pairwise_preference_model_is_exactly_symmetric(tiny_lm_dir):
    from rlhfkit.judges.preference_model import PairwisePreferenceModel
    from rlhfkit.models.reward_files import build_scalar_model

    net, tok = build_scalar_model(tiny_lm_dir, kind="reward", seed=1)
    torch.nn.init.normal_(net.head.weight, std=1.0)  # a head far from 0 so f(a, b) is far from ½
    pm = PairwisePreferenceModel(net, tok)
    items = [("Question: 1?\n", "Answer: 3", "Answer:  4"), ("Question: 2?\n", "5 + 1 = 6\nAnswer: 6", "Answer: unknown"),
             ("Question: 3?\n", "zz", "a")]
    swapped = [(p, b, a) for p, a, b in items]
    p_ab, p_ba = pm.prob(items), pm.prob(swapped)
    assert all(x + y == 1.0 for x, y in zip(p_ab, p_ba))  # exactly, not approximately
    assert pm.prob([("q", "same", "same")]) == [0.5]
    # the raw single-order f is not symmetric: the averaging is doing the work
    f = torch.sigmoid(pm.logits(items + swapped)).tolist()
    assert max(abs(f[i] + f[i + 3] - 1) for i in range(3)) > 1e-3


def test_bt_cannot_express_a_cycle_and_the_pairwise_model_can(tiny_lm_dir, tmp_path):
    """The difference between the two comparison models, as a property of their forms.

    Bradley-Terry: logit P(s≻t) + logit P(t≻w) + logit P(w≻s) = (r_s−r_t) + (r_t−r_w) + (r_w−r_s) = 0
    for any rewards, so some edge of the cycle spaced ≻ tight ≻ wide ≻ spaced has P ≤ ½. Checked on a
    saved BT model with a head far from 0 (the identity holds for every r, trained or not).

    Pairwise: P(a≻b) = ½(f(a,b) + 1 − f(b,a)) puts no such constraint on f. With a network whose
    logit is +2 when A's style beats B's and −2 when B's beats A's, each edge gets
    ½(σ(2) + 1 − σ(−2)) = σ(2) = 0.8808. (Learning such an f needs a backbone that already tells the
    two responses apart: a randomly initialised 2-layer width-32 model stays at logits ~1e-4, loss
    0.693, for 1,000 steps at lr 1e-2; on the SFT backbone, configs/intransitive.yaml learns all three
    edges, docs/preference_optimization.md.)
    """
    from rlhfkit.tasks.intransitive_judge import BEATS, answer_style, cycle, restyle
    from rlhfkit.judges.preference_model import PairwisePreferenceModel
    from rlhfkit.judges.spec import from_spec
    from rlhfkit.models.reward_files import build_scalar_model, save_scalar_model
    from rlhfkit.tasks.arith import format_prompt, gold_response, make_problems

    net, tok = build_scalar_model(tiny_lm_dir, kind="reward", seed=1)
    torch.nn.init.normal_(net.head.weight, std=1.0)
    save_scalar_model(net, tok, tmp_path / "bt")
    bt = from_spec(f"bt:{tmp_path / 'bt'}")
    probe = [(format_prompt(p), restyle(gold_response(p), a), restyle(gold_response(p), b))
             for p in make_problems(4, 9, 0.0) for a, b in BEATS.items()]
    p_bt = bt.prob(probe)
    for i in range(0, len(probe), 3):
        edges = p_bt[i:i + 3]
        assert sum(math.log(q / (1 - q)) for q in edges) == pytest.approx(0.0, abs=1e-6)
        assert min(edges) <= 0.5 and max(abs(q - 0.5) for q in edges) > 1e-3  # not trivially ½

    class CycleNet(torch.nn.Module):
        """logit +2 / −2 / 0 from the answer styles of responses A and B in the pair's text."""

        def __init__(self):
            super().__init__()
            self.info = net.info
            self.dummy = torch.nn.Parameter(torch.zeros(()))

        def forward(self, input_ids, attention_mask):
            out = []
            for ids, m in zip(input_ids, attention_mask):
                text = tok.decode(ids[m.bool()].tolist(), skip_special_tokens=True)
                a, b = text.split("Response A:\n", 1)[1].split("\nResponse B:\n")
                out.append(2.0 * cycle(answer_style(a), answer_style(b)))
            return torch.tensor(out) + self.dummy

    p_pm = PairwisePreferenceModel(CycleNet(), tok).prob(probe)
    assert p_pm == pytest.approx([1 / (1 + math.exp(-2))] * len(probe), abs=1e-12)


# ---------------------------------------------------------------- the intransitive judge

def test_intransitive_judge_by_hand():
    from rlhfkit.tasks.intransitive_judge import IntransitiveJudge, answer_style, restyle
    from rlhfkit.tasks.oracle import TaskOracle
    from rlhfkit.tasks.arith import format_prompt, gold_response, make_problems
    from rlhfkit.tasks.arith_judge import judge

    p = make_problems(1, seed=11, unanswerable_frac=0.0)[0]
    g = gold_response(p)
    s, t, w = (restyle(g, x) for x in ("spaced", "tight", "wide"))
    assert [answer_style(x) for x in (s, t, w)] == ["spaced", "tight", "wide"]
    assert judge(p, t).score == judge(p, w).score == 1.0  # the style does not change the gold score
    j = IntransitiveJudge([p], beta=10.0, gamma=3.0)
    q = format_prompt(p)
    assert j.prob([(q, s, t), (q, t, w), (q, w, s), (q, t, s)]) == pytest.approx([_sig(3), _sig(3), _sig(3), _sig(-3)])
    # correctness dominates: a wrong answer in the winning style still loses. Its score is
    # (6·0 + 3·1 + 1·0)/10 = 0.3 (steps right; the answer is a number never given: invented),
    # so P = σ(10·(0.3 − 1) + 3) = σ(−4)
    wrong = "\n".join(g.split("\n")[:-1] + [f"Answer:  {p.answer + 1}"])
    assert judge(p, wrong).score == pytest.approx(0.3)
    assert j.prob([(q, wrong, s)]) == pytest.approx([_sig(-4)])
    # the eval's noiseless verdict (TaskOracle.verdict, given the scores as judged): the sign of the same logit
    sc = lambda r: judge(p, r).score  # noqa: E731
    assert j.verdict(q, w, s, sc(w), sc(s)) == 1.0 and TaskOracle([p]).verdict(q, w, s, sc(w), sc(s)) == 0.5
    assert j.verdict(q, wrong, s, sc(wrong), sc(s)) == 0.0


@pytest.mark.slow
def test_dpo_and_dno_stages_in_a_tiny_pipeline(tmp_path):
    import json

    from conftest import tiny_pipeline_overrides

    from rlhfkit.pipeline import load_pipeline_config, run_pipeline

    over = [o for o in tiny_pipeline_overrides(tmp_path / "run") if not o.startswith("stages=")] + [
        "stages=[data, pretrain, sft, label, dpo, dno, eval]", "task.n_prompts=64",
        "label.sampling.max_new_tokens=16", "label.n_prompts=32",
        "dpo.batch_size=4", "dpo.max_steps=2", "dpo.from_rankings=best_worst",
        "dno.iterations=2", "dno.prompts_per_iteration=12", "dno.n_validation=8", "dno.batch_size=2",
        "dno.sampling.max_new_tokens=16",
        "eval.policies={sft: stage:sft/model, dpo: stage:dpo/model, dno_1: stage:dno/dno_1/model, dno_2: stage:dno/dno_2/model}",
    ]
    out = run_pipeline(load_pipeline_config(None, over))
    summary = json.loads((out / "summary.json").read_text())
    assert {"sft", "dpo", "dno_1", "dno_2"} <= set(summary["policies"])
    assert (out / "plots" / "dno_iterations.png").exists()
    assert json.loads((out / "dno" / "selected.json").read_text())["best"] in ("dno_1", "dno_2")


def test_intransitive_label_styles_is_checked():
    from rlhfkit.recipes.intransitive import IntransitiveConfig

    assert IntransitiveConfig(label_styles="uniform").label_styles == "uniform"
    assert IntransitiveConfig(label_styles="contrast").label_styles == "contrast"
    with pytest.raises(ValueError, match="label_styles"):
        IntransitiveConfig(label_styles="balanced")


def test_contrast_labels_are_style_pairs_decided_by_the_cycle():
    import random
    from types import SimpleNamespace as S

    from rlhfkit.tasks.intransitive_judge import BEATS, IntransitiveJudge, answer_style, restyle
    from rlhfkit.recipes.intransitive import label_pairs
    from rlhfkit.tasks.arith import format_prompt, gold_response, make_problems

    probs = make_problems(60, seed=5, unanswerable_frac=0.0)
    prompts = [format_prompt(p) for p in probs]
    # gamma 40 and beta 100: σ(±40) and σ(±10 per tenth of score) round to 0 or 1, so every draw is decided
    judge = IntransitiveJudge(probs, beta=100.0, gamma=40.0)
    g = [gold_response(p) for p in probs]
    wrong = ["\n".join(r.split("\n")[:-1] + [f"Answer:{p.answer + 1}"]) for r, p in zip(g, probs)]  # tight, wrong
    # first sample: the gold answer; second: identical (not compared), unfinished (not compared), or wrong
    samples = []
    for i, r in enumerate(g):
        second = [S(text=r, finished=True), S(text=r, finished=False), S(text=wrong[i], finished=True)][i % 3]
        samples += [S(text=r, finished=True), second]
    pairs, styles = label_pairs(judge, prompts, samples, "contrast", random.Random(0))
    assert len(styles) == 120
    same_content = lambda p: p["chosen"].rsplit("\n", 1)[0] == p["rejected"].rsplit("\n", 1)[0]  # noqa: E731
    contrast = [p for p in pairs if same_content(p) and answer_style(p["chosen"]) != answer_style(p["rejected"])]
    content = [p for p in pairs if p not in contrast]
    # one style-only pair per prompt (60), and the 20 gold-vs-wrong pairs, each side in one common style
    assert len(contrast) == 60 and len(content) == 20
    assert all(answer_style(p["chosen"]) == answer_style(p["rejected"]) for p in content)
    assert all(p["chosen"] == restyle(g[prompts.index(p["prompt"])], answer_style(p["chosen"])) for p in content)
    assert all(BEATS[answer_style(p["chosen"])] == answer_style(p["rejected"]) for p in contrast)
    # the three edges of the cycle are drawn about equally often (expected 20 each)
    edges = [answer_style(p["chosen"]) for p in contrast]
    assert all(edges.count(s) >= 12 for s in BEATS), edges
    # as sampled (sft): only the 20 pairs that differ and are both finished, gold (spaced) over wrong (tight)
    sft_pairs, _ = label_pairs(judge, prompts, samples, "sft", random.Random(0))
    assert len(sft_pairs) == 20 and all(answer_style(p["chosen"]) == "spaced" for p in sft_pairs)


@pytest.mark.slow
def test_intransitive_stage_in_a_tiny_pipeline(tmp_path):
    """The intransitive config end to end on a tiny model: both arms, the probe, the summary's rows."""
    import json
    from pathlib import Path

    from conftest import tiny_pipeline_overrides

    from rlhfkit.pipeline import load_pipeline_config, run_pipeline

    tiny = [o for o in tiny_pipeline_overrides(tmp_path / "run") if o.startswith(("out=", "task.", "pretrain."))]
    over = tiny + [
        "stages=[data, pretrain, intransitive, eval]", "task.n_prompts=40",
        # enough SFT for the tiny model to end its answers with EOS, so the labeling prompts give comparisons
        "intransitive.sft.max_steps=60", "intransitive.sft.lr=1e-2", "intransitive.sft.batch_size=8",
        "intransitive.n_label_prompts=12",
        "intransitive.comparison_model.max_steps=2", "intransitive.comparison_model.batch_size=4",
        "intransitive.dno.iterations=2", "intransitive.dno.prompts_per_iteration=8", "intransitive.dno.n_validation=4",
        "intransitive.dno.batch_size=2", "intransitive.dno.max_steps=2", "intransitive.dno.sampling.max_new_tokens=48",
        "eval.sampling.max_new_tokens=16",
    ]
    config = Path(__file__).resolve().parents[1] / "configs" / "intransitive.yaml"
    out = run_pipeline(load_pipeline_config(str(config), over))
    summary = json.loads((out / "summary.json").read_text())
    assert {"sft", "bt", "pm"} <= set(summary["policies"])
    assert "win_rate_vs_sft" in summary["policies"]["pm"]
    metrics = json.loads((out / "intransitive" / "metrics.json").read_text())
    assert set(metrics["cycle_probe"]) == {"judge", "bt", "pm"}
    assert metrics["label"]["n_pairs"] > 0


def test_dpo_pair_loss_passes_the_response_lengths_to_r_dpo():
    """The recipe's loss with length_alpha 0.01, β 0.1 on one pair whose log-ratio margin is 2 and whose
    chosen (30 tokens) is 20 tokens longer than its rejected (10): −log σ(0.2 − 0.2) = log 2; α = 0 gives
    plain DPO's −log σ(0.2) bit for bit."""
    from rlhfkit.preference_losses import dpo_loss
    from rlhfkit.recipes.dpo import DPOConfig, dpo_pair_loss

    pc, pr, rc, rr = torch.tensor([-10.0]), torch.tensor([-20.0]), torch.tensor([-12.0]), torch.tensor([-20.0])
    lengths, idx, w = (torch.tensor([30]), torch.tensor([10])), torch.tensor([0]), torch.ones(1)
    loss, _, _ = dpo_pair_loss(DPOConfig(beta=0.1, length_alpha=0.01), w)(pc, pr, rc, rr, lengths, idx)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    plain, _, _ = dpo_pair_loss(DPOConfig(beta=0.1), w)(pc, pr, rc, rr, lengths, idx)
    assert plain.item() == dpo_loss(pc, pr, rc, rr, 0.1)[0].item() and plain.item() < loss.item() - 0.05
    with pytest.raises(ValueError, match="length_alpha"):
        DPOConfig(loss_type="ipo", length_alpha=0.01)
