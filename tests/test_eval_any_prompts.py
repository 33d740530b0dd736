"""`rlhfkit eval` on a user's own prompts (no task ``meta``) with any judge, and the one judge factory."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

TEXTS = [
    "Question: Tom has 3 apples and buys 4 more. How many apples does Tom have?\n",
    "Question: Ann has 9 pens and gives 2 away. How many pens does Ann have?\n",
    "Question: A box holds 6 eggs. How many eggs are in 2 boxes?\n",
    "Question: Sam reads 5 pages a day. How many pages in 3 days?\n",
    "Question: There are 12 birds and 5 fly off. How many are left?\n",
    "Question: Mia has 7 coins and finds 8. How many coins does Mia have?\n",
    "Question: A bus has 20 seats and 13 are taken. How many are free?\n",
    "Question: Leo bakes 4 trays of 6 buns. How many buns?\n",
    "Question: Zoe has 15 stickers and uses 6. How many are left?\n",
    "Question: Max walks 2 miles a day for 5 days. How far does he walk?\n",
]
MAX_NEW = 12


def _write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(run: Path) -> dict[str, list[dict]]:
    by: dict[str, list[dict]] = {}
    for line in (run / "eval" / "samples.jsonl").read_text().splitlines():
        r = json.loads(line)
        by.setdefault(r.pop("policy"), []).append(r)
    return by


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@pytest.fixture(scope="module")
def models(tiny_lm_dir, tmp_path_factory):
    """A run directory holding a perturbed copy of the tiny LM (policies/noisy) and a tiny reward model
    (judges/rm), both named run-relative on the command line; the tiny LM itself is named absolute."""
    import torch

    from rlhfkit.models.loading import load_causal_lm, load_tokenizer, save_pretrained_atomic
    from rlhfkit.models.reward_files import build_scalar_model, save_scalar_model

    root = tmp_path_factory.mktemp("evalany")
    models = root / "models"
    lm, tok = load_causal_lm(tiny_lm_dir), load_tokenizer(tiny_lm_dir)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    save_pretrained_atomic(lm, tok, models / "policies" / "noisy")
    net, rtok = build_scalar_model(tiny_lm_dir, "reward", max_len=96)
    save_scalar_model(net, rtok, models / "judges" / "rm")
    return root, models


def _eval(run: Path, models: Path, tiny_lm_dir: Path, data: Path) -> int:
    import shutil

    from rlhfkit.cli import main

    shutil.copytree(models, run)  # the run directory: policies/noisy and judges/rm inside it
    policies = json.dumps({"base": str(tiny_lm_dir), "noisy": str(run / "policies" / "noisy")})
    return main(["eval", f"out={run}", f"data={data}", f"policies={policies}", "reference=base", f"judge={run / 'judges' / 'rm'}",
                 f"sampling.max_new_tokens={MAX_NEW}", "sampling.batch_size=4"])


@pytest.fixture(scope="module")
def plain_run(models, tiny_lm_dir):
    root, model_dir = models
    data = _write_jsonl(root / "prompts.jsonl", [{"prompt": t} for t in TEXTS])
    run = root / "plain"
    assert _eval(run, model_dir, tiny_lm_dir, data) == 0
    return run


def test_eval_cli_on_prompts_without_meta_with_a_reward_model_judge(plain_run, models):
    from rlhfkit.models.reward_files import load_reward_model

    run = plain_run
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert m["reference"] == "base" and m["judge"] == "reward-model:rm" and m["n_prompts"] == 10
    noisy, base = m["policies"]["noisy"], m["policies"]["base"]
    assert {"win_rate", "judge_score", "response_length", "hit_token_limit_rate"} <= set(noisy)
    assert "win_rate" not in base and {"judge_score", "response_length", "hit_token_limit_rate"} <= set(base)
    for metric in [v for k, v in noisy.items() if k != "sampled"]:  # sampled: the next test
        lo, hi = metric["ci95"]
        # 1e-12: stats.wilson_ci gives 10/10 an upper bound of 0.9999999999999999 (rounding, not width)
        assert metric["n"] == 10 and lo <= metric["mean"] <= hi + 1e-12
    rows = _rows(run)
    assert [r["prompt"] for r in rows["noisy"]] == TEXTS == [r["prompt"] for r in rows["base"]]
    # The figures are the samples' own: means of what samples.jsonl holds.
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert noisy["win_rate"]["mean"] == pytest.approx(mean([r["win_prob"] for r in rows["noisy"]]))
    assert noisy["judge_score"]["mean"] == pytest.approx(mean([r["score"] for r in rows["noisy"]]))
    assert noisy["response_length"]["mean"] == pytest.approx(mean([r["length"] for r in rows["noisy"]]))
    assert noisy["hit_token_limit_rate"]["mean"] == pytest.approx(mean([not r["finished"] for r in rows["noisy"]]))
    for r in rows["noisy"] + rows["base"]:
        assert r["length"] <= MAX_NEW and (r["finished"] or r["length"] == MAX_NEW)
    # The score is the reward model's on (prompt, response), and the win probability is
    # P(noisy ≻ base) = σ(r_noisy − r_base) for that prompt (not the reverse).
    rm = load_reward_model(models[1] / "judges" / "rm")
    assert rm.score(TEXTS, [r["response"] for r in rows["noisy"]]) == pytest.approx([r["score"] for r in rows["noisy"]], abs=1e-5)
    diffs = [a["score"] - b["score"] for a, b in zip(rows["noisy"], rows["base"])]
    assert max(abs(d) for d in diffs) > 1e-3  # the order check below has teeth
    assert [r["win_prob"] for r in rows["noisy"]] == pytest.approx([_sigmoid(d) for d in diffs], abs=1e-5)
    assert all("win_prob" not in r for r in rows["base"])


def test_eval_cli_sampled_figures_pair_sample_j_with_the_references_sample_j(plain_run, models):
    """4 samples per prompt (T = 0.7): each noisy sample's win probability is σ(r_noisy − r_base) against base's
    sample with the same index for the same prompt, and the sampled figures average a prompt's samples first."""
    from rlhfkit.models.reward_files import load_reward_model

    rows: dict[str, list[dict]] = {}
    for line in (plain_run / "eval" / "samples_sampled.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows.setdefault(r.pop("policy"), []).append(r)
    noisy, base = rows["noisy"], rows["base"]
    assert [(r["prompt"], r["sample"]) for r in noisy] == [(t, j) for t in TEXTS for j in range(4)]
    assert [(r["prompt"], r["sample"]) for r in base] == [(t, j) for t in TEXTS for j in range(4)]
    rm = load_reward_model(models[1] / "judges" / "rm")
    assert rm.score([r["prompt"] for r in noisy], [r["response"] for r in noisy]) == pytest.approx(
        [r["score"] for r in noisy], abs=1e-5)
    assert [r["win_prob"] for r in noisy] == pytest.approx(
        [_sigmoid(a["score"] - b["score"]) for a, b in zip(noisy, base)], abs=1e-5)
    m = json.loads((plain_run / "eval" / "metrics.json").read_text())["policies"]["noisy"]["sampled"]
    per_prompt = [sum(r["win_prob"] for r in noisy[i:i + 4]) / 4 for i in range(0, 40, 4)]
    assert m["win_rate"]["n"] == 10 and m["win_rate"]["mean"] == pytest.approx(sum(per_prompt) / 10)
    assert m["hit_token_limit_rate"]["n"] == 10 and "lc_win_rate" not in m


def test_the_report_renders_the_general_metrics(plain_run):
    from rlhfkit.report import write_report

    write_report(plain_run)
    md = (plain_run / "report.md").read_text()
    assert ("| policy | win_rate | win_rate (T=0.7, 4/prompt) | judge_score | judge_score (T=0.7, 4/prompt) | "
            "response_length | hit_token_limit_rate |") in md
    assert "Sampled (T=0.7, 4/prompt):" in md
    assert "| noisy | " in md and "by judge reward-model:rm" in md and "≻ base's" in md
    assert "gold_score" not in md  # no empty task columns for a run without the task's judge
    assert "P(≻ reference)" in md and "<table" in (plain_run / "report.html").read_text()


def test_win_rate_is_the_mean_of_the_judges_probabilities_of_policy_over_reference():
    """Four prompts, P(policy ≻ reference) = 0.9, 0.2, 0.5, 1.0 → win_rate = 2.6 / 4 = 0.65.

    The stub knows only (policy's, reference's) pairs in that order: a swapped call is a KeyError.
    Lengths 3, 12, 5, 12 → 8.0; two of four cut at the limit → 0.5.
    """
    from rlhfkit.data.chat import Message
    from rlhfkit.recipes.evaluate import general_metrics, judge_rows

    class Stub:
        name = "stub"

        def __init__(self):
            self.table = {("a0", "r0"): 0.9, ("a1", "r1"): 0.2, ("a2", "r2"): 0.5, ("a3", "r3"): 1.0}
            self.calls = []

        def prob(self, items):
            self.calls.append(list(items))
            return [self.table[(a, b)] for _, a, b in items]

    conv = (Message("system", "Be brief."), Message("user", "p1"))
    prompts = ["p0", conv, "p2", "p3"]
    finished = [True, False, True, False]
    lengths = [3, 12, 5, 12]
    rows = {name: [{"prompt": p, "response": f"{name[0]}{i}", "finished": f, "length": n}
                   for i, (p, f, n) in enumerate(zip(prompts, finished, lengths))] for name in ("ref", "all")}
    stub = Stub()
    judged = judge_rows(stub, prompts, rows, reference="ref")
    assert len(stub.calls) == 1  # the reference is not compared with itself
    assert [it[0] for it in stub.calls[0]] == prompts and stub.calls[0][1][0] is conv  # prompts passed unchanged
    m = general_metrics(judged["all"], seed=0)
    assert m["win_rate"]["mean"] == pytest.approx(0.65) and m["win_rate"]["n"] == 4
    lo, hi = m["win_rate"]["ci95"]
    assert 0.2 <= lo <= 0.65 <= hi <= 1.0
    assert m["response_length"]["mean"] == pytest.approx(8.0)
    assert m["hit_token_limit_rate"]["mean"] == pytest.approx(0.5)
    assert "judge_score" not in m  # a judge without pointwise scores
    assert set(general_metrics(judged["ref"], seed=0)) == {"response_length", "hit_token_limit_rate"}


def test_from_spec_names_an_unknown_spec_and_the_accepted_forms(tiny_lm_dir, tmp_path):
    from rlhfkit.judges.spec import from_spec
    from rlhfkit.tasks import JUDGES

    with pytest.raises(ValueError, match=r"judge 'no-such-judge'.*reward-model directory.*judge YAML"):
        from_spec("no-such-judge")
    with pytest.raises(ValueError, match="not a reward or preference model"):
        from_spec(str(tiny_lm_dir))  # a policy directory is no judge
    with pytest.raises(ValueError, match="needs records of the embedded task"):
        from_spec("oracle", [{"prompt": "hi"}], task_judges=JUDGES)


def test_from_spec_finds_stage_paths_under_base_dir_and_other_paths_as_given(tmp_path, monkeypatch):
    from rlhfkit.judges.spec import from_spec
    from rlhfkit.tasks import JUDGES
    from rlhfkit.tasks.arith import format_prompt, make_problems
    from rlhfkit.tasks.oracle import TaskOracle

    (tmp_path / "run" / "reward").mkdir(parents=True)
    (tmp_path / "run" / "reward" / "judge.yaml").write_text("kind: oracle\nbeta: 2.0\n")
    monkeypatch.chdir(tmp_path)  # "reward/judge.yaml" is not in the working directory: only base_dir has it
    records = [{"prompt": format_prompt(p), "meta": p.to_meta()} for p in make_problems(3, seed=0, unanswerable_frac=0.0)]
    j = from_spec("stage:reward/judge.yaml", records, base_dir=tmp_path / "run", task_judges=JUDGES)
    assert isinstance(j, TaskOracle) and j.beta == 2.0
    assert from_spec("run/reward/judge.yaml", records, base_dir=tmp_path / "run", task_judges=JUDGES).beta == 2.0  # as given
    # the path rule: a relative path is not looked up in the run; the error says how to name it there
    with pytest.raises(ValueError, match="judge 'reward/judge.yaml'.*stage:reward/judge.yaml"):
        from_spec("reward/judge.yaml", records, base_dir=tmp_path / "run", task_judges=JUDGES)
    with pytest.raises(ValueError, match="stage:"):
        from_spec("stage:reward/judge.yaml", records, task_judges=JUDGES)


def test_eval_on_messages_records(plain_run, models, tiny_lm_dir):
    """The same prompts as ``{"messages": [...]}``: single user turns render as the plain text, so the first
    two batches of four answer exactly as the plain run did; the last two carry a system turn too."""
    root, model_dir = models
    recs = [{"messages": [{"role": "user", "content": t}]} for t in TEXTS[:8]]
    recs += [{"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": t}]}
             for t in TEXTS[8:]]
    data = _write_jsonl(root / "messages.jsonl", recs)
    run = root / "messages"
    assert _eval(run, model_dir, tiny_lm_dir, data) == 0
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert m["n_prompts"] == 10 and m["policies"]["noisy"]["win_rate"]["n"] == 10
    rows, plain = _rows(run), _rows(plain_run)
    assert [r["prompt"] for r in rows["noisy"]] == [rec["messages"] for rec in recs]  # written as message lists
    for name in ("base", "noisy"):
        assert [(r["response"], r["finished"]) for r in rows[name][:8]] == [(r["response"], r["finished"]) for r in plain[name][:8]]
        assert [r["score"] for r in rows[name][:8]] == pytest.approx([r["score"] for r in plain[name][:8]], abs=1e-5)
    assert [r["win_prob"] for r in rows["noisy"][:8]] == pytest.approx([r["win_prob"] for r in plain["noisy"][:8]], abs=1e-5)


def test_llm_and_http_judges_show_a_conversation_prompt_as_text():
    """Both LLM judges put the prompt into one judging message (judges/prompt.py): a conversation is
    shown as its turns, never as the repr of a tuple."""
    from rlhfkit.data.chat import Message
    from rlhfkit.judges.prompt import JudgePrompt

    conv = (Message("system", "Be brief."), Message("user", "What is 2+2?"))
    user = JudgePrompt().messages(conv, "4", "5", cot=False)[1]["content"]
    assert "# Instruction\nsystem: Be brief.\nuser: What is 2+2?\n\n# Response A\n4" in user
    single = JudgePrompt().messages((Message("user", "What is 2+2?"),), "4", "5", cot=False)[1]["content"]
    assert single == JudgePrompt().messages("What is 2+2?", "4", "5", cot=False)[1]["content"]


def test_eval_reports_the_length_controlled_win_rate_beside_the_raw_one(plain_run):
    """``lc_win_rate`` is AlpacaEval 2's fit on the very rows samples.jsonl holds (win_prob, lengths in tokens),
    and ``reference_length`` the reference's mean length on the same prompts; the summary's Bias part has them."""
    from rlhfkit.bias import length_controlled_win_rate
    from rlhfkit.report import write_report

    m = json.loads((plain_run / "eval" / "metrics.json").read_text())
    noisy, base = m["policies"]["noisy"], m["policies"]["base"]
    rows = _rows(plain_run)
    lc = length_controlled_win_rate([r["win_prob"] for r in rows["noisy"]], [r["length"] for r in rows["noisy"]],
                                    [r["length"] for r in rows["base"]], seed=0)
    assert noisy["lc_win_rate"] == {k: lc[k] for k in ("mean", "ci95", "n", "length_coef", "length_sd")}
    assert noisy["lc_win_rate"]["n"] == 10 and lc["raw_win_rate"] == pytest.approx(noisy["win_rate"]["mean"], abs=1e-12)
    assert noisy["reference_length"]["mean"] == base["response_length"]["mean"]
    assert "lc_win_rate" not in base
    bias = write_report(plain_run)["bias"]["policies"]
    assert bias["noisy"]["lc_win_rate"]["mean"] == lc["mean"] and bias["noisy"]["length_coef"] == lc["length_coef"]
    assert bias["noisy"]["win_rate"]["mean"] == noisy["win_rate"]["mean"]
