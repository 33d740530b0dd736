"""Sampled evaluation beside greedy: each figure averaged over a prompt's samples first, its CI over prompts;
the win rate pairs sample j of the policy with sample j of the reference; the config refuses what cannot work."""
from __future__ import annotations

import pytest

from rlhfkit.config import ConfigError, load_config
from rlhfkit.generation import SamplingConfig
from rlhfkit.pipeline import PipelineConfig
from rlhfkit.recipes.evaluate import (EvalConfig, SampledEvalConfig, general_metrics, judge_rows, per_prompt_means,
                                      policy_metrics)
from rlhfkit.stats import mean_ci


class HigherScoreWins:
    """A stub task judge: 1 when the policy's score is higher, ½ on a tie, 0 otherwise; it records each pair."""

    def __init__(self):
        self.pairs = []

    def verdict(self, prompt, a, b, score_a, score_b):
        self.pairs.append((prompt, a, b))
        return 1.0 if score_a > score_b else (0.5 if score_a == score_b else 0.0)


def _rows(name, prompts, answerable, scores, correct=None, abstained=None, invented=None, lengths=None):
    """Prompt-major task rows, two samples per prompt; response ``{name}{prompt}{sample}``."""
    n = len(scores)
    correct, abstained = correct or [False] * n, abstained or [False] * n
    invented, lengths = invented or [False] * n, lengths or [1] * n
    return [{"prompt": prompts[i // 2], "response": f"{name}{prompts[i // 2]}{i % 2}", "score": scores[i],
             "correct": correct[i], "abstained": abstained[i], "invented": invented[i], "unsafe": False,
             "answerable": answerable[i // 2], "finished": True, "length": lengths[i]} for i in range(n)]


def test_sampled_figures_average_each_prompts_samples_then_take_the_ci_over_prompts():
    """Three prompts × two samples. A and B answerable, C not.

    policy scores A (1, 0), B (1, 1), C (1, 0); reference A (½, 0), B (1, 0), C (1, 1).
    Verdicts, sample j against sample j: A (1 > ½ → 1, 0 = 0 → ½) → ¾; B (1 = 1 → ½, 1 > 0 → 1) → ¾;
    C (1 = 1 → ½, 0 < 1 → 0) → ¼. win_rate_vs_sft = (¾ + ¾ + ¼) / 3 = 1.75 / 3, n = 3 prompts (not 6 samples).
    (Crossed pairs would give A (1 > 0, 0 < ½) → ½; all four pairs of A → (1 + 1 + 0 + ½) / 4 = 5/8.)
    gold_score: A ½, B 1, C ½ → 2 / 3. accuracy on A, B: A (yes, no) → ½, B (yes, yes) → 1 → ¾, n = 2.
    abstain_rate on C: (yes, no) → ½, n = 1; false_abstain_rate on A, B: 0, n = 2.
    invented: C's second sample → per prompt (0, 0, ½) → 1/6. lengths A (4, 6) → 5, B (2, 2) → 2, C (3, 5) → 4 → 11/3.
    """
    prompts, answerable = ["A", "B", "C"], [True, True, False]
    rows = _rows("p", prompts, answerable, [1.0, 0.0, 1.0, 1.0, 1.0, 0.0], correct=[True, False, True, True, False, False],
                 abstained=[False, False, False, False, True, False], invented=[False, False, False, False, False, True],
                 lengths=[4, 6, 2, 2, 3, 5])
    ref = _rows("r", prompts, answerable, [0.5, 0.0, 1.0, 0.0, 1.0, 1.0])
    m = policy_metrics(rows, ref, 0, HigherScoreWins(), samples_per_prompt=2)
    assert m["win_rate_vs_sft"] == {"mean": 1.75 / 3, "ci95": mean_ci([0.75, 0.75, 0.25], 0)["ci95"], "n": 3}
    assert m["gold_score"] == mean_ci([0.5, 1.0, 0.5], 0) and m["gold_score"]["mean"] == 2 / 3
    assert m["accuracy"] == mean_ci([0.5, 1.0], 0) and m["accuracy"]["mean"] == 0.75 and m["accuracy"]["n"] == 2
    assert m["abstain_rate"]["mean"] == 0.5 and m["abstain_rate"]["n"] == 1
    assert m["false_abstain_rate"]["mean"] == 0.0 and m["false_abstain_rate"]["n"] == 2
    assert m["invented_number_rate"]["mean"] == pytest.approx(1 / 6) and m["invented_number_rate"]["n"] == 3
    assert m["response_length"]["mean"] == pytest.approx(11 / 3) and m["finished_rate"]["mean"] == 1.0
    # The CI is over the three prompts' means, not over the six samples (which would have n = 6).
    assert m["win_rate_vs_sft"]["ci95"] != mean_ci([1.0, 0.5, 0.5, 1.0, 0.5, 0.0], 0)["ci95"]
    assert "lc_win_rate_vs_sft" not in m and "reference_length" not in m  # no length control on sampled figures


def test_sampled_win_rate_pairs_sample_j_with_the_references_sample_j():
    prompts = ["A", "B"]
    rows = _rows("p", prompts, [True, True], [1.0, 0.0, 0.0, 1.0])
    ref = _rows("r", prompts, [True, True], [0.5, 0.5, 0.5, 0.5])
    judge = HigherScoreWins()
    m = policy_metrics(rows, ref, 0, judge, samples_per_prompt=2)
    assert judge.pairs == [("A", "pA0", "rA0"), ("A", "pA1", "rA1"), ("B", "pB0", "rB0"), ("B", "pB1", "rB1")]
    assert m["win_rate_vs_sft"]["mean"] == 0.5 and m["win_rate_vs_sft"]["n"] == 2  # A (1, 0) → ½, B (0, 1) → ½
    with pytest.raises(ValueError):  # a reference with another number of samples is refused, not truncated
        policy_metrics(rows, ref[:2], 0, judge, samples_per_prompt=2)


def test_general_path_sampled_figures_pair_samples_and_average_per_prompt():
    """Two prompts × two samples; the stub knows only (policy's sample j, reference's sample j) pairs.
    P = 0.9, 0.3 on p0 → 0.6; 0.2, 0.2 on p1 → 0.2: win_rate = 0.4, n = 2.
    Lengths (3, 12) → 7.5 and (5, 12) → 8.5 → 8; cut at the limit (no, yes) → ½ and (no, yes) → ½ → ½."""

    class Stub:
        table = {("a00", "r00"): 0.9, ("a01", "r01"): 0.3, ("a10", "r10"): 0.2, ("a11", "r11"): 0.2}

        def prob(self, items):
            return [self.table[(a, b)] for _, a, b in items]

    prompts = ["p0", "p0", "p1", "p1"]
    rows = {name: [{"prompt": p, "response": f"{name[0]}{i // 2}{i % 2}", "finished": i % 2 == 0, "length": n}
                   for i, (p, n) in enumerate(zip(prompts, [3, 12, 5, 12]))] for name in ("ref", "all")}
    judged = judge_rows(Stub(), prompts, rows, reference="ref")
    m = general_metrics(judged["all"], 0, judged["ref"], samples_per_prompt=2)
    assert m["win_rate"]["mean"] == pytest.approx(0.4) and m["win_rate"]["n"] == 2
    assert m["response_length"] == mean_ci([7.5, 8.5], 0) and m["hit_token_limit_rate"]["mean"] == 0.5
    assert "lc_win_rate" not in m


def test_per_prompt_means():
    assert per_prompt_means([1, 0, True, True, 0.5, 0.0], 2) == [0.5, 1.0, 0.25]
    assert per_prompt_means([1, 0, 1], 1) == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="5 values are not 2 per prompt"):
        per_prompt_means([1, 0, 1, 1, 0], 2)


@pytest.mark.parametrize("override, key", [("temperature=0", "temperature"), ("temperature=-0.5", "temperature"),
                                           ("samples_per_prompt=0", "samples_per_prompt"), ("batch_size=0", "batch_size")])
def test_sampled_config_refuses_what_cannot_sample_and_names_the_field(override, key):
    with pytest.raises(ConfigError, match=rf"eval\.sampled: {key} must be a finite number > 0"):
        load_config(PipelineConfig, None, [f"eval.sampled.{override}"])


def test_sampled_config_defaults_and_sampler_settings():
    cfg = load_config(PipelineConfig, None, ["eval.sampling.max_new_tokens=32", "eval.sampled.samples_per_prompt=8",
                                             "eval.sampling.bf16=true"])
    assert cfg.eval.sampled == SampledEvalConfig(enabled=True, temperature=0.7, samples_per_prompt=8, batch_size=200)
    sc = cfg.eval.sampled.sampling(cfg.eval.sampling)
    # greedy's length limit and precision; 200 sequences per generate call = 25 prompts × 8
    assert (sc.max_new_tokens, sc.temperature, sc.top_p, sc.batch_size, sc.bf16) == (32, 0.7, 1.0, 25, True)
    assert SampledEvalConfig(samples_per_prompt=300).sampling(SamplingConfig(max_new_tokens=64)).batch_size == 1
    assert EvalConfig().sampled.enabled
    assert not load_config(PipelineConfig, None, ["eval.sampled.enabled=false"]).eval.sampled.enabled
