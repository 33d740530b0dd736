"""Step boundaries (``rlhfkit.data.steps``): a step is a line, the separator configurable.

The newline-token test on the task tokenizer is the PPO recipe's old ``line_end_positions`` test,
moved here with the function; the others use a tokenizer whose tokens are given strings, so the
character offsets can be worked out by hand.
"""
from __future__ import annotations

from rlhfkit.data.steps import STEP_SEPARATOR, join_steps, split_steps, step_end_positions


class _StringTokenizer:
    """Token i decodes to ``vocab[i]``; ``eos`` decodes to nothing (a special token)."""

    def __init__(self, vocab: list[str], eos: int):
        self.vocab, self.eos = vocab, eos

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.vocab[i] for i in ids if not (skip_special_tokens and i == self.eos))


def test_split_steps_strips_the_response_and_each_step_and_keeps_interior_blank_lines():
    assert STEP_SEPARATOR == "\n"
    assert split_steps("  a \n\nb\n") == ["a", "", "b"]
    assert split_steps("3 + 4 = 7\n7 * 2 = 14\nAnswer: 14") == ["3 + 4 = 7", "7 * 2 = 14", "Answer: 14"]
    assert split_steps("") == [] and split_steps(" \n ") == []


def test_split_steps_with_another_separator():
    """Separator ";": " a; b;c " → strip → "a; b;c" → ["a", " b", "c"] → each stripped → ["a", "b", "c"];
    the newline inside "x\\ny" is then no boundary."""
    assert split_steps(" a; b;c ", ";") == ["a", "b", "c"]
    assert split_steps("x\ny;z", ";") == ["x\ny", "z"]


def test_join_steps_puts_one_separator_between_steps_and_split_gives_them_back():
    steps = ["2 + 3 = 5", "", "Answer: 5"]
    assert join_steps(steps) == "2 + 3 = 5\n\nAnswer: 5"
    assert split_steps(join_steps(steps)) == steps
    assert join_steps(["a", "b"], " || ") == "a || b" and split_steps("a || b", " || ") == ["a", "b"]


def test_step_end_positions_by_hand_when_a_token_holds_more_than_the_newline():
    """Tokens "ab" "\\n" "c" "\\nd" "\\n" then EOS: text "ab\\nc\\nd\\n", stripped "ab\\nc\\nd" (chars 0..5).

    Cumulative decoded lengths 2, 3, 4, 6, 7. Newline at char 2 → first token ending past 2: token 1;
    newline at char 4 → first token ending past 4: token 3 ("\\nd"); the trailing newline (char 6) is
    stripped, no boundary; the last step ends at the last of the 6 response tokens (EOS): 5.
    """
    tok = _StringTokenizer(["ab", "\n", "c", "\nd", "\n", "<eos>"], eos=5)
    assert step_end_positions(tok, [0, 1, 2, 3, 4], n_tokens=6) == [1, 3, 5]
    assert len(split_steps(tok.decode([0, 1, 2, 3, 4]))) == 3


def test_step_end_positions_with_a_two_character_separator():
    """Separator "\\n\\n", tokens "a" "\\n" "\\n" "b" "\\n" "c": text "a\\n\\nb\\nc"; one separator, chars 1-2,
    completed by token 2 (cumulative lengths 1, 2, 3, ...); the lone "\\n" at char 4 is no boundary.
    Steps ["a", "b\\nc"]: ends [2, 5] (no EOS: the last token is the last step's end)."""
    tok = _StringTokenizer(["a", "\n", "\n", "b", "\n", "c"], eos=99)
    assert split_steps(tok.decode([0, 1, 2, 3, 4, 5]), "\n\n") == ["a", "b\nc"]
    assert step_end_positions(tok, [0, 1, 2, 3, 4, 5], n_tokens=6, separator="\n\n") == [2, 5]
    # Three newlines hold one "\n\n" (chars 1-2), not two overlapping ones, as str.split cuts: ["a", "b"], ends [2, 4].
    assert split_steps("a\n\n\nb", "\n\n") == ["a", "b"]
    assert step_end_positions(tok, [0, 1, 2, 4, 3], n_tokens=5, separator="\n\n") == [2, 4]


def test_step_end_positions_of_a_blank_response_are_empty():
    tok = _StringTokenizer([" ", "\n"], eos=9)
    assert step_end_positions(tok, [0, 1, 0], n_tokens=3) == []


def test_step_end_positions_find_the_newline_tokens(tiny_tokenizer):
    text = "3 + 4 = 7\n7 * 2 = 14\nAnswer: 14"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    newlines = [i for i, t in enumerate(ids) if tiny_tokenizer.decode([t]) == "\n"]
    assert len(newlines) == 2
    pos = step_end_positions(tiny_tokenizer, ids, len(ids) + 1)  # + EOS
    assert pos == [newlines[0], newlines[1], len(ids)]
    assert len(pos) == len(split_steps(text))
    # Leading/trailing newlines are not step boundaries (split_steps strips them).
    ids2 = tiny_tokenizer("\n" + text + "\n", add_special_tokens=False)["input_ids"]
    assert step_end_positions(tiny_tokenizer, ids2, len(ids2)) == [newlines[0] + 1, newlines[1] + 1, len(ids2) - 1]
