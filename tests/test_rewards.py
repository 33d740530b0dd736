"""Where rewards land (``rlhfkit.rewards``): each function with values worked out by hand.

Moved here from test_ppo.py with the functions (the first two placement tests and the PRM
telescoping test are the recipe's old ones); the rest are new.
"""
from __future__ import annotations

import math

import pytest
import torch

from rlhfkit.generation import Sample, sequences_from_samples
from rlhfkit.rewards import length_adjusted_scores, penalize_unfinished, place_token_rewards, prm_step_rewards


# ---------------------------------------------------------------- the unfinished penalty

def test_an_unfinished_response_gets_the_penalty_in_place_of_its_score():
    """scores [0.5, 2.0, −3.0], finished [yes, no, yes], penalty −1 → [0.5, −1.0, −3.0].

    Replaced, not added: 2.0 + (−1) = 1.0 would be the bug; a finished −3.0 keeps its own score.
    """
    got = penalize_unfinished(torch.tensor([0.5, 2.0, -3.0]), torch.tensor([True, False, True]), -1.0)
    assert got.tolist() == [0.5, -1.0, -3.0]


# ---------------------------------------------------------------- placement

def test_score_is_read_at_the_last_real_token_even_when_pad_is_eos():
    eos = pad = 2  # pad == EOS: "the first pad" would be the EOS of a finished response
    samples = [
        Sample("p", [5, 6], [7, 8, 9], "", finished=True),  # prompt 2 + response 3 + EOS: last at index 5
        Sample("p", [5], [7, 8], "", finished=False),  # prompt 1 + response 2, no EOS: last at index 2
    ]
    batch = sequences_from_samples(samples, pad, eos)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 2], [5, 7, 8, 2, 2, 2]]
    rewards = place_token_rewards(batch["response_mask"], torch.tensor([1.5, -1.0]))
    assert rewards.tolist() == [[0, 0, 0, 0, 0, 1.5], [0, 0, -1.0, 0, 0, 0]]


def test_score_lands_on_the_last_response_token_under_left_padding():
    """mask rows [0 0 0 1 1] and [0 1 1 1 0] (padding on both sides): last response tokens 4 and 3.

    scores [2, −1] → rows [0 0 0 0 2] and [0 0 0 −1 0]; "the first 0 after a 1" and "the last column"
    would both put row 0's score elsewhere (there is no 0 after its 1s; its last column is right only
    by chance, row 1's is a pad).
    """
    mask = torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 1, 0]])
    rewards = place_token_rewards(mask, torch.tensor([2.0, -1.0]))
    assert rewards.tolist() == [[0, 0, 0, 0, 2.0], [0, 0, 0, -1.0, 0]]
    assert rewards.dtype == torch.float32


def test_step_rewards_go_to_their_tokens_within_the_response():
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0]])  # response occupies positions 2..5
    rewards = place_token_rewards(mask, torch.tensor([0.0]), [[(1, -0.5), (3, -0.25)]])
    assert rewards.tolist() == [[0, 0, 0, -0.5, 0, -0.25, 0]]


def test_step_rewards_count_from_each_rows_first_response_token_and_add_to_the_score():
    """Row 0: response at 1..3, score 0.5 at 3, step (2, 0.25) at 1 + 2 = 3 → 0.75 there, step (0, −1) at 1.
    Row 1: response at 3..4, score −2 at 4, step (0, 0.5) at 3 + 0 = 3.

    Indices counted from column 0 instead of each row's first response token would put row 1's
    step at column 0 (a prompt token); overwriting instead of adding would leave 0.25 at row 0's end.
    """
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 0, 1, 1]])
    rewards = place_token_rewards(mask, torch.tensor([0.5, -2.0]), [[(2, 0.25), (0, -1.0)], [(0, 0.5)]])
    assert rewards.tolist() == [[0, -1.0, 0, 0.75, 0], [0, 0, 0, 0.5, -2.0]]


# ---------------------------------------------------------------- PRM step rewards

def test_prm_step_rewards_telescope_to_the_log_outcome():
    """q = [0.8, 0.4, 0.001], floor 0.01: r = [log 0.8, log 0.4 − log 0.8, log 0.01 − log 0.4]."""
    r = prm_step_rewards([0.8, 0.4, 0.001], floor=0.01)
    assert r == pytest.approx([math.log(0.8), math.log(0.5), math.log(0.01 / 0.4)])
    assert sum(r) == pytest.approx(math.log(0.01))
    assert prm_step_rewards([], floor=0.01) == []


def test_prm_step_rewards_are_the_change_in_log_probability_by_hand():
    """q = [0.5, 0.5, 0.125], floor 0.01: r = [log 0.5 − log 1, log 0.5 − log 0.5, log 0.125 − log 0.5]
    = [−log 2, 0, −2·log 2]. A step that leaves P(right so far) unchanged earns exactly 0; the ratio
    q_k / q_{k−1}, not q_k itself, is what step k is credited with (log q_k alone would give −log 2 twice).
    """
    r = prm_step_rewards([0.5, 0.5, 0.125], floor=0.01)
    assert r[1] == 0.0
    assert r == pytest.approx([-math.log(2), 0.0, -2 * math.log(2)], abs=1e-12)


def test_length_adjusted_scores_subtract_the_length_normalised_penalty():
    """scores [1.0, 0.5], lengths [10, 40], max_new_tokens 64, coef 0.5:
    [1 − 0.5·10/64, 0.5 − 0.5·40/64] = [1 − 0.078125, 0.5 − 0.3125] = [0.921875, 0.1875].
    A negative coef (a deliberate length bias) adds the same amounts: [1.078125, 0.8125]."""
    scores, lengths = torch.tensor([1.0, 0.5]), torch.tensor([10, 40])
    assert length_adjusted_scores(scores, lengths, 64, 0.5).tolist() == [0.921875, 0.1875]
    assert length_adjusted_scores(scores, lengths, 64, -0.5).tolist() == [1.078125, 0.8125]
    # Direction: of two equally scored responses the longer ends lower under a penalty, higher under a bias.
    a, b = length_adjusted_scores(torch.tensor([1.0, 1.0]), torch.tensor([5, 50]), 64, 0.2).tolist()
    assert a > b
