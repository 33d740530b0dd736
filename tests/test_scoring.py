"""The RL stages' reward sources (``rlhfkit.scoring``): the functions a config names, and a rollout's
samples scored and placed on their tokens, each with values worked out by hand."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from rlhfkit import scoring
from rlhfkit.config import ConfigError
from rlhfkit.data.loading import PromptRecord
from rlhfkit.generation import Sample, SamplingConfig, sequences_from_samples
from rlhfkit.models.reward import HeadInfo
from rlhfkit.recipes.ppo import PPOConfig
from rlhfkit.scoring import Scorer, make_scorer, score_samples

PAD, EOS, PROMPT = 0, 1, 6


class _StringTokenizer:
    """Token i decodes to VOCAB[i]; pad and EOS decode to nothing."""

    VOCAB = ["<pad>", "<eos>", "a", "\n", "b", "c", "Q"]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.VOCAB[i] for i in ids if not (skip_special_tokens and i in (PAD, EOS)))


def _samples() -> list[Sample]:
    """Row 0 finished "a\\nb" (2 steps), row 1 unfinished "c\\n", row 2 finished but empty (EOS at once)."""
    return [Sample("q", [PROMPT], [2, 3, 4], "a\nb", True), Sample("q", [PROMPT], [5, 3], "c\n", False),
            Sample("q", [PROMPT], [], "", True)]


def _step_rewards(prompts, responses):
    return [{"a\nb": [-0.5, -0.25], "c\n": [-2.0], "": []}[r] for r in responses]


def test_prm_step_rewards_land_on_the_tokens_closing_their_steps_and_unfinished_rows_get_the_penalty():
    """Rows (prompt at column 0, EOS id 1):  0: Q a \\n b EOS   1: Q c \\n   2: Q EOS.

    Row 0 is finished, 2 steps: step 1 ends at its newline (column 2) → −0.5; step 2 at the last
    response token, the EOS (column 4) → −0.25; raw score −0.5 − 0.25 = −0.75.
    Row 1 never ended: the penalty −1 replaces its score, at its last token (column 2); no step reward.
    Row 2 ended but has no step: a PRM's sum over zero steps (0, the best score) is no answer; penalty −1
    at its only response token, the EOS (column 1).
    """
    samples = _samples()
    mask = sequences_from_samples(samples, PAD, EOS)["response_mask"]
    assert mask.tolist() == [[0, 1, 1, 1, 1], [0, 1, 1, 0, 0], [0, 1, 0, 0, 0]]
    cfg = PPOConfig(reward_source="prm", unfinished_score=-1.0)
    got = score_samples(Scorer(None, _step_rewards, None), samples, _StringTokenizer(), mask, cfg)
    assert got.raw.tolist() == [-0.75, -1.0, -1.0] and got.scores.tolist() == [-0.75, -1.0, -1.0]
    assert got.token_rewards.tolist() == [[0, 0, -0.5, 0, -0.25], [0, 0, -1.0, 0, 0], [0, -1.0, 0, 0, 0]]
    assert got.costs is None
    # prm_step_rewards false: the same scores, each whole at its row's last response token.
    cfg = PPOConfig(reward_source="prm", unfinished_score=-1.0, prm_step_rewards=False)
    got = score_samples(Scorer(None, _step_rewards, lambda p, r: [0.5, 1.5, 2.5]), samples, _StringTokenizer(), mask, cfg)
    assert got.token_rewards.tolist() == [[0, 0, 0, 0, -0.75], [0, 0, -1.0, 0, 0], [0, -1.0, 0, 0, 0]]
    assert got.costs.tolist() == [0.5, 1.5, 2.5]


def test_outcome_scores_are_clipped_after_the_penalty():
    """Outcome scores [3, 0.25, 9] for rows finished/unfinished/finished, penalty −2, score_clip 1:
    raw [3, −2, 9] (row 2 is finished: an outcome scorer has no steps to miss) → scores [1, −1, 1]."""
    samples = _samples()
    mask = sequences_from_samples(samples, PAD, EOS)["response_mask"]
    cfg = PPOConfig(reward_source="callable", unfinished_score=-2.0, score_clip=1.0)
    got = score_samples(Scorer(lambda p, r: [3.0, 0.25, 9.0], None, None), samples, _StringTokenizer(), mask, cfg)
    assert got.raw.tolist() == [3.0, -2.0, 9.0] and got.scores.tolist() == [1.0, -1.0, 1.0]
    assert got.token_rewards.tolist() == [[0, 0, 0, 0, 1.0], [0, 0, -1.0, 0, 0], [0, 1.0, 0, 0, 0]]


def test_prm_coef_adds_scaled_step_rewards_to_the_reward_models_score():
    """reward_source model + prm_coef 2: the RM's scores [3, 0.25, 9] (row 1 unfinished → penalty −2), clipped
    to 1 → [1, −1, 1] at each last response token, as without the PRM; then 2 × the PRM's step rewards on the
    finished, non-empty row 0 only: −0.5·2 = −1 at its newline (column 2) and −0.25·2 = −0.5 at its EOS
    (column 4), where the RM's 1 already is: 1 − 0.5 = 0.5. Row 1 (unfinished) and row 2 (empty) get none.
    The sequence scores themselves (raw, scores) are the RM's: the bonus lives in the token rewards."""
    samples = _samples()
    mask = sequences_from_samples(samples, PAD, EOS)["response_mask"]
    cfg = PPOConfig(reward_source="model", unfinished_score=-2.0, score_clip=1.0, prm_coef=2.0)
    bonus = lambda p, r: [[2.0 * x for x in row] for row in _step_rewards(p, r)]  # noqa: E731 (make_scorer's scaling)
    got = score_samples(Scorer(lambda p, r: [3.0, 0.25, 9.0], None, None, bonus), samples, _StringTokenizer(), mask, cfg)
    assert got.raw.tolist() == [3.0, -2.0, 9.0] and got.scores.tolist() == [1.0, -1.0, 1.0]
    assert got.token_rewards.tolist() == [[0, 0, -1.0, 0, 0.5], [0, 0, -1.0, 0, 0], [0, 1.0, 0, 0, 0]]


def test_make_scorer_scales_the_prm_step_rewards_by_prm_coef(tmp_path, monkeypatch):
    """The PRM's q = [0.5, 0.25] → r = [log 0.5, log 0.25 − log 0.5] = [−0.693, −0.693]; × prm_coef 0.5 →
    [−0.347, −0.347]; a q of 0.001 is floored at prm_floor 0.01 first: r = log 0.01 = −4.605 → −2.303. The
    outcome is the RM's. prm_coef needs reward_source model."""

    class _PRM(_Fixed):
        def step_scores(self, prompts, responses):
            return [[0.5, 0.25], [0.001]]

    models = {"rm": _Fixed([1.0, 2.0]), "prm": _PRM(None)}
    monkeypatch.setattr(scoring, "load_reward_model", lambda path, **where: models[Path(path).name])
    for name in models:
        (tmp_path / name).mkdir()
    cfg = PPOConfig(reward_source="model", reward_models=("stage:rm",), prm="stage:prm", prm_coef=0.5, prm_floor=0.01)
    scorer = make_scorer(cfg, tmp_path)
    assert scorer.outcome(["p"] * 2, ["x", "y"]) == [1.0, 2.0] and scorer.steps is None
    got = scorer.step_bonus(["p"] * 2, ["x", "y"])
    assert got[0] == pytest.approx([0.5 * math.log(0.5), 0.5 * (math.log(0.25) - math.log(0.5))], abs=1e-12)
    assert got[1] == pytest.approx([0.5 * math.log(0.01)], abs=1e-12)
    assert make_scorer(PPOConfig(reward_source="model", reward_models=("stage:rm",)), tmp_path).step_bonus is None
    with pytest.raises(ValueError, match="prm_coef .* needs reward_source model"):
        PPOConfig(reward_source="prm", prm_coef=0.5, score_whiten=False)


class _Fixed:
    info = HeadInfo()

    def __init__(self, values):
        self.values = values

    def score(self, prompts, responses):
        return self.values


def test_several_reward_models_score_mean_minus_penalty_times_std(tmp_path, monkeypatch):
    """Members score [1, 4] and [3, 4], ensemble_penalty 2: mean − 2·std (unbiased) = [2 − 2·√2, 4 − 0].
    One member alone gives its own scores, unchanged."""
    fixed = {"a": [1.0, 4.0], "b": [3.0, 4.0]}
    monkeypatch.setattr(scoring, "load_reward_model", lambda path, **where: _Fixed(fixed[Path(path).name]))
    for name in fixed:
        (tmp_path / name).mkdir()
    cfg = PPOConfig(reward_source="model", reward_models=("stage:a", "stage:b"), ensemble_penalty=2.0)
    assert make_scorer(cfg, tmp_path).outcome(["p"] * 2, ["x", "y"]) == pytest.approx([2 - 2 * math.sqrt(2), 4.0], abs=1e-12)
    assert make_scorer(PPOConfig(reward_source="model", reward_models=("stage:b",)), tmp_path).outcome(["p"], ["x"]) == [3.0, 4.0]
    with pytest.raises(ConfigError, match="run the reward stage first"):
        make_scorer(PPOConfig(reward_source="model", reward_models=("stage:missing",)), tmp_path)


def test_the_judge_source_is_the_task_oracle_built_by_the_judge_factory(tmp_path):
    """reward_source judge: the oracle's gold score, 1.0 for the gold solution, 0.0 for a non-answer."""
    from rlhfkit.tasks import JUDGES
    from rlhfkit.tasks.arith import format_prompt, gold_response, make_problems

    problems = make_problems(3, seed=1, unanswerable_frac=0.0)
    records = [PromptRecord(format_prompt(p), p.to_meta(), "x") for p in problems]
    scorer = make_scorer(PPOConfig(reward_source="judge"), tmp_path, records, task_judges=JUDGES)
    prompts = [r.prompt for r in records]
    assert scorer.outcome(prompts, [gold_response(p) for p in problems]) == [1.0, 1.0, 1.0]
    assert scorer.outcome(prompts[:1], ["no idea"]) == [0.0]
    with pytest.raises(ValueError, match="meta"):
        make_scorer(PPOConfig(reward_source="judge"), tmp_path, [PromptRecord("q", None, "x")], task_judges=JUDGES)


def test_length_penalty_applies_after_the_unfinished_penalty_and_before_clipping():
    """Outcome scores [3, 0.25, 9]; response lengths (EOS excluded) [3, 2, 0]; max_new_tokens 4; penalty −2.
    reward_length_penalty 1: raw [3, −2, 9] (the reward source's, unchanged) → scores
    [3 − 3/4, −2 − 2/4, 9 − 0/4] = [2.25, −2.5, 9]; with score_clip 2.375 → [2.25, −2.375, 2.375].
    reward_length_bias 1 instead: [3 + 3/4, −2 + 2/4, 9] = [3.75, −1.5, 9]. Both 0.5: the terms cancel."""
    samples = _samples()
    mask = sequences_from_samples(samples, PAD, EOS)["response_mask"]
    scorer = Scorer(lambda p, r: [3.0, 0.25, 9.0], None, None)
    sampling = {"max_new_tokens": 4, "temperature": 1.0, "top_p": 1.0, "batch_size": 4}

    def scored(**kw):
        cfg = PPOConfig(reward_source="callable", unfinished_score=-2.0, sampling=SamplingConfig(**sampling), **kw)
        return score_samples(scorer, samples, _StringTokenizer(), mask, cfg)

    got = scored(reward_length_penalty=1.0)
    assert got.raw.tolist() == [3.0, -2.0, 9.0] and got.scores.tolist() == [2.25, -2.5, 9.0]
    assert got.token_rewards.tolist() == [[0, 0, 0, 0, 2.25], [0, 0, -2.5, 0, 0], [0, 9.0, 0, 0, 0]]
    assert scored(reward_length_penalty=1.0, score_clip=2.375).scores.tolist() == [2.25, -2.375, 2.375]
    assert scored(reward_length_bias=1.0).scores.tolist() == [3.75, -1.5, 9.0]
    assert scored(reward_length_penalty=0.5, reward_length_bias=0.5).scores.tolist() == [3.0, -2.0, 9.0]


def test_length_penalty_with_prm_step_rewards_lands_at_the_last_token_of_a_finished_response():
    """As the PRM test above (row 0 steps −0.5, −0.25; rows 1, 2 the penalty −1), max_new_tokens 4,
    reward_length_penalty 1: row 0 (3 tokens) adds −3/4 at its last token (column 4): −0.25 − 0.75 = −1.0;
    row 1 (unfinished, 2 tokens): −1 − 2/4 = −1.5; row 2 (0 tokens): −1."""
    samples = _samples()
    mask = sequences_from_samples(samples, PAD, EOS)["response_mask"]
    cfg = PPOConfig(reward_source="prm", unfinished_score=-1.0, reward_length_penalty=1.0,
                    sampling=SamplingConfig(max_new_tokens=4))
    got = score_samples(Scorer(None, _step_rewards, None), samples, _StringTokenizer(), mask, cfg)
    assert got.token_rewards.tolist() == [[0, 0, -0.5, 0, -1.0], [0, 0, -1.5, 0, 0], [0, -1.0, 0, 0, 0]]
