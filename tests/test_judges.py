"""Judges: the prompt, agreement math worked by hand, and the local LLM judge on a tiny model."""
from __future__ import annotations

import math

import pytest
import torch

from rlhfkit.judges.agreement import (agreement_between, agreement_with_labels, kendall_tau, position_bias,
                                      ranking_pair_agreement)
from rlhfkit.judges.base import PreferenceFunction
from rlhfkit.judges.http import HTTPJudge
from rlhfkit.judges.llm import LLMJudge
from rlhfkit.judges.prompt import JudgePrompt, Judgment, prompt_from_files

ITEMS = [("Question: Tom has 3 apples and buys 2 more. How many?\n", "3 + 2 = 5\nAnswer: 5", "Answer: 7"),
         ("Question: Ann has 4 pens and loses 1. How many?\n", "Answer: 2", "4 - 1 = 3\nAnswer: 3"),
         ("Question: 2 boxes of 6 eggs. How many eggs?\n", "2 * 6 = 12\nAnswer: 12", "Answer: 8")]


def test_parse_letter_and_prompt_files(tmp_path):
    p = JudgePrompt()
    assert p.parse_letter("A") == 0 and p.parse_letter(" B.") == 1
    assert p.parse_letter("A is long, but B is right. Answer: B") == 1
    assert p.parse_letter("neither") is None and p.parse_letter("BANANA") is None
    assert JudgePrompt(labels=("1", "2")).parse_letter("Answer: 2") == 1
    with pytest.raises(ValueError):
        JudgePrompt(labels=("A", "A"))
    const = tmp_path / "constitution.txt"
    const.write_text("# principles\n- Be correct.\n- Do not invent numbers.\n\n")
    jp = prompt_from_files(None, str(const), ("A", "B"))
    assert "1. Be correct.\n2. Do not invent numbers." in jp.rubric
    msgs = jp.messages("Q?", "first", "second", cot=False)
    assert "# Response A\nfirst" in msgs[1]["content"] and "# Response B\nsecond" in msgs[1]["content"]
    with pytest.raises(ValueError, match="not found"):
        prompt_from_files(str(tmp_path / "missing.txt"), None, ("A", "B"))
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no principles"):
        prompt_from_files(None, str(tmp_path / "empty.txt"), ("A", "B"))


def test_agreement_figures_by_hand():
    # Labels a,a,b,b. Judge: right, wrong, tie (half), right -> (1 + 0 + 0.5 + 1) / 4.
    assert agreement_with_labels([0.9, 0.2, 0.5, 0.1], [True, True, False, False]) == pytest.approx(2.5 / 4)
    assert agreement_between([0.9, 0.2, 0.5], [0.6, 0.7, 0.1]) == pytest.approx((1 + 0 + 0.5) / 3)
    # [0,1,2] vs [0,2,1]: pairs (0,1) (0,2) agree, (1,2) does not -> 2/3; tau = (2 - 1) / 3.
    assert ranking_pair_agreement([0, 1, 2], [0, 2, 1]) == pytest.approx(2 / 3)
    assert kendall_tau([0, 1, 2], [0, 2, 1]) == pytest.approx(1 / 3)
    assert kendall_tau([0, 1, 2, 3], [3, 2, 1, 0]) == -1.0 and kendall_tau([1, 0], [1, 0]) == 1.0
    with pytest.raises(ValueError):
        kendall_tau([0, 1, 1], [0, 1, 2])
    js = [Judgment(0.5, 0.9, 0.1), Judgment(0.8, 0.7, 0.9), Judgment(0.6, 0.6, 0.5), Judgment(0.2, 0.3, 0.1)]
    # Flips: item 0 only (0.9 vs 0.1); item 2 has a tie -> undecided. Rate 1 / 3.
    # First slot wins: item0 both orders (0.9 > .5; 1 - 0.1 > .5), item1 first only, item2 first only
    # (1 - 0.5 is no win), item3 second order (1 - 0.1) -> 5 of 8.
    b = position_bias(js)
    assert b["rate"] == pytest.approx(1 / 3) and b["n_undecided"] == 1 and b["first_slot_rate"] == pytest.approx(5 / 8)


class AlwaysFirst(torch.nn.Module):
    """A judge model with a position bias: the logit of one token is pushed up at every position."""

    def __init__(self, inner, token_id: int):
        super().__init__()
        self.inner, self.token_id = inner, token_id

    def forward(self, **kw):
        out = self.inner(**kw)
        out.logits[..., self.token_id] += 50.0
        return out


@pytest.fixture(scope="module")
def tiny(tiny_lm_dir):
    from rlhfkit.models.local import load_for_inference

    return load_for_inference(str(tiny_lm_dir))


def test_llm_judge_reads_label_logits_exactly(tiny):
    model, tok = tiny
    judge = LLMJudge(model, tok, average_orders=False, batch_size=1)
    assert isinstance(judge, PreferenceFunction)
    p = judge.prob(ITEMS[:1])[0]
    # By hand: the next-token distribution after the rendered prompt, both spellings of each label.
    ctx = judge._render(judge.prompt.messages(*ITEMS[0], cot=False))
    ids = tok(ctx, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], -1)
    mass = []
    for label in ("A", "B"):
        spellings = [tok(ctx + v, add_special_tokens=False)["input_ids"] for v in (label, " " + label)]
        toks = {s[-1] for s in spellings if len(s) == len(ids) + 1}  # one-token spellings only
        assert toks
        mass.append(sum(math.exp(logp[t].item()) for t in toks))
    assert p == pytest.approx(mass[0] / (mass[0] + mass[1]), abs=1e-5)


def test_llm_judge_orders_batching_and_position_bias(tiny):
    model, tok = tiny
    one = LLMJudge(model, tok, average_orders=False, batch_size=1)
    avg = LLMJudge(model, tok, average_orders=True, batch_size=3)
    forward = one.prob(ITEMS)
    swapped = one.prob([(q, b, a) for q, a, b in ITEMS])
    js = avg.judge(ITEMS)
    for j, f, s in zip(js, forward, swapped):
        # Left padding in a batch of 3 gives what one prompt alone gives.
        assert j.prob_a_first == pytest.approx(f, abs=1e-4)
        assert j.prob_a_second == pytest.approx(1 - s, abs=1e-4)
        assert j.prob == pytest.approx(0.5 * (f + 1 - s), abs=1e-4)
    # A model that always answers with the first slot's label: every verdict flips with the order,
    # and averaging cancels the bias exactly.
    a_id = tok("A", add_special_tokens=False)["input_ids"][0]
    biased = LLMJudge(AlwaysFirst(model, a_id), tok, average_orders=True, batch_size=2)
    bj = biased.judge(ITEMS)
    assert all(j.prob_a_first > 0.99 and j.prob_a_second < 0.01 for j in bj)
    assert position_bias(bj)["rate"] == 1.0 and position_bias(bj)["first_slot_rate"] == 1.0
    assert all(j.prob == pytest.approx(0.5, abs=0.01) for j in bj)


def test_llm_judge_chain_of_thought_keeps_rationales(tiny):
    model, tok = tiny
    judge = LLMJudge(model, tok, average_orders=True, cot=True, max_new_tokens=6)
    js = judge.judge(ITEMS[:2])
    for j in js:
        assert len(j.rationales) == 2 and all(isinstance(r, str) for r in j.rationales)
        assert all(len(tok(r, add_special_tokens=False)["input_ids"]) <= 8 for r in j.rationales)
        assert 0.0 <= j.prob <= 1.0
    with pytest.raises(ValueError, match="triple"):
        judge.judge([("only", "two")])


def test_http_judge_reads_logprobs_and_letters():
    j = HTTPJudge("http://127.0.0.1:9/v1", "m")
    resp = {"choices": [{"message": {"content": "A"}, "logprobs": {"content": [
        {"token": "A", "logprob": math.log(0.3), "top_logprobs": [
            {"token": "A", "logprob": math.log(0.3)}, {"token": "x", "logprob": math.log(0.2)},
            {"token": " B", "logprob": math.log(0.1)}]}]}}]}
    assert j._read(resp)[0] == pytest.approx(0.75)
    assert j._read({"choices": [{"message": {"content": "I pick B"}}]})[0] == 0.0
    assert j._read({"choices": [{"message": {"content": "Answer: A"}, "logprobs": None}]})[0] == 1.0
    assert j._read({"choices": [{"message": {"content": "no idea"}}]})[0] == 0.5
    with pytest.raises(ValueError):
        HTTPJudge("localhost:8000", "m")
