"""Math-Shepherd step-label estimation: exact labels with fake completers, and the label stage's `estimate` option."""
from __future__ import annotations

import json

import pytest

from rlhfkit.data.step_estimation import EstimateMode, estimate_step_labels, step_prefixes

GOLD = {0: 10, 1: 7}  # the right final answer of prompt index 0 and 1
RESPONSE = "2 + 3 = 5\n5 * 2 = 10\nAnswer: 10"
PREFIX_1 = "2 + 3 = 5\n"
PREFIX_2 = "2 + 3 = 5\n5 * 2 = 10\n"
COMPLETIONS = {
    PREFIX_1: ["5 * 2 = 10\nAnswer: 10", "5 + 5 = 10\nAnswer: 10", "Answer: 10", "5 * 2 = 11\nAnswer: 11"],
    # after step 2 nothing reaches 10; the last one would, but it did not finish (None), so it counts as wrong
    PREFIX_2: ["Answer: 9", "Answer: 12", "10 - 1 = 9\nAnswer: 9", None],
}


def _is_correct(i: int, text: str) -> bool:
    return text.strip().split("\n")[-1] == f"Answer: {GOLD[i]}"


def test_step_prefixes_cut_after_each_line_and_end_with_a_newline():
    assert step_prefixes(RESPONSE) == [PREFIX_1, PREFIX_2, "2 + 3 = 5\n5 * 2 = 10\nAnswer: 10\n"]
    # lines as the PRM and load_steps see them (rlhfkit.data.steps.split_steps): stripped, blank lines kept
    assert step_prefixes("  a \n\nb\n") == ["a\n", "a\n\n", "a\n\nb\n"]
    assert step_prefixes("") == [] and step_prefixes(" \n ") == []


@pytest.mark.parametrize("mode, first_step", [("soft", 0.75), ("hard", 1.0)])
def test_labels_are_the_share_of_completions_that_reach_the_answer(mode, first_step):
    """Prompt 0, RESPONSE: 3 of 4 completions after step 1 end in "Answer: 10" → SE 3/4 = 0.75, HE 1;
    none after step 2 does (one is unfinished) → 0 in both modes; the last line is the response's own
    answer, right → 1. Prompt 1 (gold 7): a one-line wrong answer → [0], with no completion asked;
    the empty response has no step → []."""
    calls, checked = [], []

    def complete(queries, n):
        calls.append((list(queries), n))
        return [COMPLETIONS[prefix] for _, prefix in queries]

    def is_correct(i, text):
        checked.append((i, text))
        return _is_correct(i, text)

    labels = estimate_step_labels(["Q0", "Q1", "Q1"], [RESPONSE, "Answer: 8", ""], complete, is_correct, 4, mode)
    assert labels == [[first_step, 0.0, 1.0], [0.0], []]
    # one batched call: every prefix but the last of every response
    assert calls == [([("Q0", PREFIX_1), ("Q0", PREFIX_2)], 4)]
    # each completion is checked as prefix + completion; the unfinished one is never checked
    assert (0, PREFIX_1 + "5 * 2 = 11\nAnswer: 11") in checked
    assert len(checked) == 4 + 3 + 2 and (0, RESPONSE) in checked and (1, "Answer: 8") in checked


def test_responses_that_share_a_prefix_share_its_completions_and_are_checked_each_as_its_own():
    """Two samples of prompt 0 open with the same line, PREFIX_1: it is asked once (4 distinct queries of the 5
    steps before a last line), and both get its 3/4; the second's own second step "5 + 5 = 10" is asked apart. The same prefix under
    another prompt is another query. Each response's completions are checked with its own index."""
    calls, checked = [], []
    other = "2 + 3 = 5\n5 + 5 = 10\nAnswer: 10"
    completions = {**COMPLETIONS, "2 + 3 = 5\n5 + 5 = 10\n": ["Answer: 10", "Answer: 10", "Answer: 1", None]}

    def complete(queries, n):
        calls.append(list(queries))
        return [completions[prefix] for _, prefix in queries]

    def is_correct(i, text):  # responses 0 and 1 answer prompt 0 (gold 10), response 2 prompt 1 (gold 7)
        checked.append(i)
        return text.strip().split("\n")[-1] == f"Answer: {[10, 10, 7][i]}"

    labels = estimate_step_labels(["Q0", "Q0", "Q1"], [RESPONSE, other, "2 + 3 = 5\nAnswer: 7"], complete,
                                  is_correct, 4)
    # 3/4 after PREFIX_1 for both; 0/4 after PREFIX_2; 2/4 after "5 + 5 = 10" (the unfinished one counts as wrong);
    # under prompt 1 (gold 7) no completion of PREFIX_1 ends in 7: 0/4; every last line is right
    assert labels == [[0.75, 0.0, 1.0], [0.75, 0.5, 1.0], [0.0, 1.0]]
    assert calls == [[("Q0", PREFIX_1), ("Q0", PREFIX_2), ("Q0", "2 + 3 = 5\n5 + 5 = 10\n"), ("Q1", PREFIX_1)]]
    # PREFIX_1's 4 completions under Q0 are checked once per owner (with 0 and with 1); PREFIX_2's 3 finished ones
    # with 0, "5 + 5 = 10"'s 3 finished ones with 1, Q1's 4 with 2; then each response's own answer
    assert sorted(checked) == sorted([0] * (4 + 3) + [1] * (4 + 3) + [2] * 4 + [0, 1, 2])


def test_a_wrong_final_answer_is_labelled_zero_even_when_earlier_steps_could_succeed():
    response = "2 + 3 = 5\nAnswer: 11"
    labels = estimate_step_labels(["Q"], [response], lambda q, n: [["Answer: 10", "Answer: 3"]], _is_correct, 2,
                                  EstimateMode.soft)
    assert labels == [[0.5, 0.0]]


def test_bad_mode_n_or_completion_shape_is_rejected():
    with pytest.raises(ValueError, match="mode must be one of soft, hard, got 'medium'"):
        estimate_step_labels(["Q"], [RESPONSE], lambda q, n: [], _is_correct, 4, "medium")
    with pytest.raises(ValueError, match="n must be at least 1"):
        estimate_step_labels(["Q"], [RESPONSE], lambda q, n: [], _is_correct, 0)
    with pytest.raises(ValueError, match="must return 2 lists of 4 completions"):
        estimate_step_labels(["Q"], [RESPONSE], lambda q, n: [["Answer: 10"]] * 2, _is_correct, 4)


def test_label_config_rejects_an_unknown_estimate_mode_or_step_label_source():
    from rlhfkit.config import ConfigError, load_config
    from rlhfkit.recipes.label import LabelConfig, StepLabels

    with pytest.raises(ConfigError, match="estimate_mode.*'medium' is not one of soft, hard"):
        load_config(LabelConfig, None, ["estimate_mode=medium"])
    with pytest.raises(ConfigError, match="step_labels.*'human' is not one of oracle, estimate"):
        load_config(LabelConfig, None, ["step_labels=human"])
    with pytest.raises(ValueError, match="estimate_mode must be one of soft, hard, got 'medium'"):
        LabelConfig(estimate_mode="medium")
    with pytest.raises(ValueError, match="estimate_n must be at least 1"):
        LabelConfig(estimate_n=0)
    cfg = LabelConfig(step_labels="estimate", estimate_n=3, estimate_mode="hard")
    assert cfg.step_labels is StepLabels.estimate and cfg.step_labeller == "math-shepherd(n=3, hard)"
    assert LabelConfig().step_labeller == "oracle step labels"  # the embedded task's default


def test_sampling_from_a_response_prefix_continues_it(tiny_lm_dir):
    """Greedy: continuing the first m tokens of a greedy response gives the rest of that response."""
    from rlhfkit.generation import SamplingConfig, sample
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer

    tok, lm = load_tokenizer(tiny_lm_dir), load_causal_lm(tiny_lm_dir)
    greedy = SamplingConfig(max_new_tokens=12, temperature=0.0)
    prompt = "Question: Tom has 3 apples. How many apples does Tom have now?\n"
    (whole,) = sample(lm, tok, [prompt], greedy)
    m = next(m for m in range(6, 0, -1)  # a cut whose text re-tokenizes to the same ids
             if tok(tok.decode(whole.response_ids[:m]), add_special_tokens=False)["input_ids"] == whole.response_ids[:m])
    prefix = tok.decode(whole.response_ids[:m])
    (rest,) = sample(lm, tok, [prompt], SamplingConfig(max_new_tokens=12 - m, temperature=0.0), response_prefixes=[prefix])
    assert rest.prompt_ids == whole.prompt_ids + whole.response_ids[:m]
    assert rest.response_ids == whole.response_ids[m:]
    with pytest.raises(ValueError, match="1 prompts but 2 response prefixes"):
        sample(lm, tok, [prompt], greedy, response_prefixes=["a", "b"])


def test_label_stage_estimates_step_labels_from_policy_completions(tiny_lm_dir, tmp_path, monkeypatch):
    """k=2 samples of 3 prompts, n=2 completions per step prefix, on the tiny untrained policy.

    The untrained policy rarely writes a newline, so every response would be one line and no
    prefix would be completed; a +3 logit on the newline token makes multi-line responses (and
    so completions) the rule. A spy on ``sample`` counts the completions asked for.
    """
    import torch
    from accelerate import Accelerator

    import rlhfkit.generation
    import rlhfkit.models.loading
    from rlhfkit.data.preferences import load_steps
    from rlhfkit.pipeline import load_pipeline_config
    from rlhfkit.recipes import label
    from rlhfkit.stage import StageContext
    from rlhfkit.tasks.arith import Problem, format_prompt, make_problems
    from rlhfkit.data.steps import split_steps
    from rlhfkit.tasks.arith_judge import judge

    load, sample = rlhfkit.models.loading.load_causal_lm, rlhfkit.generation.sample

    def load_newline_prone(path):
        lm = load(path)
        newline = rlhfkit.models.loading.load_tokenizer(path)("\n", add_special_tokens=False)["input_ids"]
        assert len(newline) == 1
        lm.lm_head.register_forward_hook(lambda mod, inp, out: out.index_add(-1, torch.tensor(newline),
                                                                             torch.full((*out.shape[:-1], 1), 3.0)))
        return lm

    prefixed = []

    def spy(*args, response_prefixes=None, **kw):
        if response_prefixes is not None:
            prefixed.append((list(zip(args[2], response_prefixes)), kw["num_return_sequences"]))
        return sample(*args, response_prefixes=response_prefixes, **kw)

    monkeypatch.setattr(label, "load_causal_lm", load_newline_prone)
    monkeypatch.setattr(label, "sample", spy)
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": format_prompt(p), "meta": p.to_meta()} for p in make_problems(3, seed=5, unanswerable_frac=0.34)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_pipeline_config(None, [f"label.policy={tiny_lm_dir}", f"label.data={prompts}", "label.k=2",
                                      "label.step_labels=estimate", "label.estimate_n=2",
                                      "label.sampling.max_new_tokens=12"]).label
    (tmp_path / "stage").mkdir()
    m = label.run(cfg, StageContext(tmp_path, tmp_path / "stage", "label", Accelerator()))
    steps = [json.loads(x) for x in (tmp_path / "stage" / "steps.jsonl").read_text().splitlines()]
    assert m["steps"] == len(steps) > 0 and m["step_labels"] == "math-shepherd(n=2, soft)"
    for r in steps:
        assert r["provenance"]["judge"] == "math-shepherd(n=2, soft)"
        assert len(r["labels"]) == len(split_steps(r["completion"]))
        assert all(y in (0.0, 0.5, 1.0) for y in r["labels"])  # shares of n = 2 completions
        # the last line is the sample's own outcome
        v = judge(Problem.from_meta(r["meta"]), r["completion"])
        assert r["labels"][-1] == float(v.correct and r["finished"])
    # one batched call for the chunk: every step prefix but the last of every sample, n = 2 each
    expected = [(r["prompt"], p) for r in steps for p in step_prefixes(r["completion"])[:-1]]
    assert len(expected) > 0 and prefixed == [(expected, 2)]
    assert len(load_steps(tmp_path / "stage" / "steps.jsonl")) == len(steps)  # the PRM's loader takes them
