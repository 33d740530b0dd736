"""Preference data in the formats people have: pairs, HH-RLHF transcripts, K-wise rankings,
step-labelled solutions (PRM) and per-response safety labels (cost models).

Every loader reads JSONL, JSONL.gz, JSON, Parquet and ``datasets.save_to_disk`` directories
through :func:`rlhfkit.data.loading.iter_records`, and names ``file:line`` for a bad record
before any model is loaded. The record shape is detected per record, so one file may mix
pairs and rankings:

- pair:     ``{"prompt", "chosen", "rejected", "margin"?}``; the prompt may be a list of messages and each
            response a list of messages ending with the assistant's (TRL's conversational format);
            without ``prompt``, chosen and rejected are whole conversations sharing all but the last turn
- HH-RLHF:  ``{"chosen", "rejected"}`` whole dialogues, split at the last ``"\\n\\nAssistant:"``
- ranking:  ``{"prompt", "responses": [...], "ranking": [best index, ..., worst index]}``
- steps:    ``{"prompt", "steps": [...] | "completion": "line\\nline", "labels": [1, 0, null, ...]}``
- PRM800K:  one rated step a row (``instruction``, ``responses``, ``next_response``, ``rating``)
- safety:   ``{"prompt", "response" | "completion", "is_safe"}``
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from rlhfkit.data.chat import ChatFormatError, Prompt, parse_messages, split_conversation
from rlhfkit.data.loading import DataError, Located, iter_records, read_completion, read_prompt, require
from rlhfkit.data.steps import STEP_SEPARATOR, join_steps, split_steps

HH_ASSISTANT = "\n\nAssistant:"


@dataclass(frozen=True)
class PreferencePair:
    """One comparison; pairs expanded from one ranking share ``group`` and carry weight 1/C(K,2)."""

    prompt: Prompt
    chosen: str
    rejected: str
    margin: float | None = None
    weight: float = 1.0
    group: int = 0
    where: str = ""


@dataclass
class PairSet:
    """Loaded pairs, plus the records that were reported and left out (never silently used)."""

    pairs: list[PreferencePair] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def groups(self) -> list[list[int]]:
        """Pair indices by ranking (one group per ranking or pair), in file order."""
        out: dict[int, list[int]] = {}
        for i, p in enumerate(self.pairs):
            out.setdefault(p.group, []).append(i)
        return list(out.values())


def split_hh(transcript: str, where: str, side: str) -> tuple[str, str]:
    """(prompt, response) of an HH-RLHF dialogue: the prompt keeps the final ``\\n\\nAssistant:``."""
    cut = transcript.rfind(HH_ASSISTANT)
    if cut < 0:
        raise DataError(f"{where}: field '{side}' is not an HH-RLHF transcript (no '\\n\\nAssistant:' turn)")
    prompt = transcript[: cut + len(HH_ASSISTANT)]
    # An empty final reply occurs in the real HH data (e.g. train line 427) and is a legal choice.
    return prompt, transcript[cut + len(HH_ASSISTANT):].strip()


def _margin(rec: Located) -> float | None:
    m = rec.record.get("margin")
    if m is None:
        return None
    if isinstance(m, bool) or not isinstance(m, (int, float)):
        raise DataError(f"{rec.where}: field 'margin' must be a number")
    return float(m)


def _ranking_pairs(rec: Located, group: int) -> list[PreferencePair]:
    from rlhfkit.losses import ranking_pairs  # lazy: losses imports torch; reading pairs needs none

    require(rec, {"prompt": str, "responses": list, "ranking": list}, nonempty=("prompt",))
    responses, ranking = rec.record["responses"], rec.record["ranking"]
    if not all(isinstance(r, str) for r in responses):
        raise DataError(f"{rec.where}: field 'responses' must be a list of strings")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ranking) or sorted(ranking) != list(range(len(responses))):
        raise DataError(f"{rec.where}: field 'ranking' must order the indices 0..{len(responses) - 1} "
                        f"of 'responses' (best first), got {ranking}")
    if len(responses) < 2:
        raise DataError(f"{rec.where}: a ranking needs at least 2 responses")
    return [PreferencePair(rec.record["prompt"], responses[w], responses[l], None, weight, group, rec.where)
            for w, l, weight in ranking_pairs(ranking)]


def _implicit_prompt_pair(rec: Located) -> tuple:
    """TRL's conversational pair without a ``prompt`` field: two whole conversations that share every turn
    but the last assistant one; the shared turns are the prompt."""
    try:
        c_prompt, chosen = split_conversation(parse_messages(rec.record["chosen"], "chosen"), rec.where, "chosen")
        r_prompt, rejected = split_conversation(parse_messages(rec.record["rejected"], "rejected"), rec.where, "rejected")
    except ChatFormatError as e:
        raise DataError(f"{rec.where}: {e}" if rec.where not in str(e) else str(e)) from None
    if c_prompt != r_prompt:
        raise DataError(f"{rec.where}: 'chosen' and 'rejected' conversations differ before their last assistant turn")
    return c_prompt, chosen, rejected


def load_pairs(path: str | Path, max_unusable: float = 0.5) -> PairSet:
    """Pairs, HH transcripts and rankings from one file (shape detected per record).

    An HH pair whose two dialogues differ before the last Assistant turn, and a pair whose chosen equals
    its rejected, are reported in ``skipped`` with their location and left out; a file where more than
    ``max_unusable`` of the records are left out is refused, saying why.
    """
    out = PairSet()
    for group, rec in enumerate(iter_records(path)):
        r = rec.record
        if "ranking" in r or "responses" in r:
            out.pairs.extend(_ranking_pairs(rec, group))
        elif "prompt" in r:
            prompt = read_prompt(rec)
            chosen, rejected = read_completion(rec, "chosen"), read_completion(rec, "rejected")
            for side, text in (("chosen", chosen), ("rejected", rejected)):
                if not text.strip():
                    raise DataError(f"{rec.where}: field '{side}' is empty")
            if chosen == rejected:  # no preference at all: zero gradient in every pairwise loss
                out.skipped.append(f"{rec.where}: chosen equals rejected")
                continue
            out.pairs.append(PreferencePair(prompt, chosen, rejected, _margin(rec), 1.0, group, rec.where))
        elif isinstance(r.get("chosen"), list) and isinstance(r.get("rejected"), list):
            prompt, chosen, rejected = _implicit_prompt_pair(rec)
            out.pairs.append(PreferencePair(prompt, chosen, rejected, _margin(rec), 1.0, group, rec.where))
        elif "chosen" in r and "rejected" in r:
            require(rec, {"chosen": str, "rejected": str})
            p_c, chosen = split_hh(r["chosen"], rec.where, "chosen")
            p_r, rejected = split_hh(r["rejected"], rec.where, "rejected")
            if p_c != p_r:
                out.skipped.append(f"{rec.where}: chosen and rejected dialogues differ before the last Assistant turn")
                continue
            if chosen == rejected:
                out.skipped.append(f"{rec.where}: chosen equals rejected")
                continue
            out.pairs.append(PreferencePair(p_c, chosen, rejected, _margin(rec), 1.0, group, rec.where))
        else:
            raise DataError(f"{rec.where}: not a preference record: expected prompt/chosen/rejected, "
                            f"an HH chosen/rejected dialogue, or prompt/responses/ranking; got keys {sorted(r)}")
    if not out.pairs:
        why = f": all {len(out.skipped)} left out, e.g. {out.skipped[0]}" if out.skipped else ""
        raise DataError(f"{path}: no preference pairs{why}")
    n_records = len(out.groups) + len(out.skipped)
    if len(out.skipped) > max_unusable * n_records:
        raise DataError(f"{path}: {len(out.skipped)} of {n_records} records are unusable (more than "
                        f"{max_unusable:.0%}), e.g. {out.skipped[0]}; fix the file or raise the stage's max_unusable_share")
    return out


@dataclass(frozen=True)
class StepRecord:
    """A solution as lines, each with a label: 1 right, 0 wrong, a soft value in [0, 1], or None (unrated)."""

    prompt: str
    steps: tuple[str, ...]
    labels: tuple[float | None, ...]
    correct: bool | None = None
    """the final outcome, for an outcome reward model; None if the record does not say"""
    where: str = ""

    @property
    def completion(self) -> str:
        return join_steps(self.steps)


def _prm800k_row(rec: Located, ambiguous: str) -> StepRecord | None:
    r = rec.record
    if r.get("is_human_response"):
        return None  # a human-written hint, not a rated model step (PRM800K README)
    rating = r.get("rating")
    if rating is None or rating != rating:  # None or NaN: unrated
        return None
    if isinstance(rating, bool) or not isinstance(rating, (int, float)):
        raise DataError(f"{rec.where}: field 'rating' must be -1, 0, 1 or null, got {rating!r}")
    require(rec, {"instruction": str, "next_response": str}, nonempty=("instruction",))
    if rating == 0:
        if ambiguous == "drop":
            return None
        label = 1.0 if ambiguous == "positive" else 0.0
    else:
        label = 1.0 if rating > 0 else 0.0
    prev = r["responses"]
    if isinstance(prev, str):
        try:
            prev = json.loads(prev)
        except json.JSONDecodeError:
            raise DataError(f"{rec.where}: field 'responses' must be a list of steps") from None
    prev = [str(s) for s in (prev if prev is not None else [])]
    steps = tuple(s.replace(STEP_SEPARATOR, " ") for s in [*prev, r["next_response"]])  # one step a line
    return StepRecord(r["instruction"], steps, (None,) * len(prev) + (label,), None, rec.where)


def _label(v, where: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return float(v)
    if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
        raise DataError(f"{where}: a step label must be 0, 1, a probability in [0, 1], or null; got {v!r}")
    return float(v)


def load_steps(path: str | Path, ambiguous: str = "drop") -> list[StepRecord]:
    """Step-labelled solutions; PRM800K rows too (``ambiguous``: how rating 0 counts: drop/positive/negative)."""
    if ambiguous not in ("drop", "positive", "negative"):
        raise ValueError(f"ambiguous must be drop, positive or negative, got {ambiguous!r}")
    out = []
    for rec in iter_records(path):
        r = rec.record
        if "next_response" in r and "rating" in r:
            s = _prm800k_row(rec, ambiguous)
            if s is not None:
                out.append(s)
            continue
        require(rec, {"prompt": str, "labels": list}, nonempty=("prompt",))
        if "steps" in r:
            require(rec, {"steps": list})
            steps = [str(s) for s in r["steps"]]
            if any(STEP_SEPARATOR in s for s in steps):
                raise DataError(f"{rec.where}: a step may not contain a newline (a step is a line)")
        elif "completion" in r:
            require(rec, {"completion": str})
            steps = split_steps(r["completion"])
        else:
            raise DataError(f"{rec.where}: missing field 'steps' (or 'completion')")
        labels = tuple(_label(v, rec.where) for v in r["labels"])
        if len(labels) != len(steps):
            raise DataError(f"{rec.where}: {len(steps)} steps but {len(labels)} labels")
        if not steps:
            raise DataError(f"{rec.where}: a solution needs at least one step")
        correct = r.get("correct")
        if correct is not None and not isinstance(correct, bool):
            raise DataError(f"{rec.where}: field 'correct' must be true or false")
        out.append(StepRecord(r["prompt"], tuple(steps), labels, correct, rec.where))
    if not out:
        raise DataError(f"{path}: no step-labelled records")
    return out


@dataclass(frozen=True)
class SafetyRecord:
    """One response with a safety label (the cost model's sign: unsafe → positive cost)."""

    prompt: str
    response: str
    is_safe: bool
    where: str = ""


def load_safety(path: str | Path) -> list[SafetyRecord]:
    out = []
    for rec in iter_records(path):
        r = rec.record
        key = "response" if "response" in r else "completion"
        if "is_safe" not in r and ("steps" in r or "labels" in r):
            continue  # a step-labelled record without a safety label
        require(rec, {"prompt": str, key: str, "is_safe": bool}, nonempty=("prompt",))
        out.append(SafetyRecord(r["prompt"], r[key], r["is_safe"], rec.where))
    if not out:
        raise DataError(f"{path}: no safety-labelled records")
    return out


def safety_pairs(records: Sequence[SafetyRecord]) -> list[tuple[SafetyRecord, SafetyRecord]]:
    """(safer, unsafer) pairs for the Safe RLHF cost loss, from per-response labels.

    Within a prompt every safe response is paired with every unsafe one (the ranking term
    learns from these). A response in no such pair is paired with itself: the ranking term is
    then the constant log 2 with no gradient, and only its sign terms train, so no label is lost.
    """
    by_prompt: dict[str, list[SafetyRecord]] = {}
    for r in records:
        by_prompt.setdefault(r.prompt, []).append(r)
    pairs = []
    for group in by_prompt.values():
        safe = [r for r in group if r.is_safe]
        unsafe = [r for r in group if not r.is_safe]
        pairs.extend((s, u) for s in safe for u in unsafe)
        if not safe or not unsafe:
            pairs.extend((r, r) for r in group)
    return pairs
