"""``rlhfkit judge-eval``: how well a judge agrees with gold labels, and how position-biased it is.

Every pair is judged in both orders, whatever the config's ``average_orders``, so one run
gives the agreement of the first order alone (no averaging), of the swapped order alone, of
both averaged, and the position-bias rate (``position_bias``: the share of decided pairs whose verdict
flips with the order, i.e. the same slot wins both times; ``first_slot_rate``: the share of single-order
verdicts won by the first slot; ``first_slot_preference``: the mean probability given to the first slot,
``bias.position_bias``). ``position_bias_over_max``: whether the label stage would refuse this judge
without order averaging (``--max-position-bias``, the label stage's ``max_position_bias``). The headline
``agreement`` follows the config.
The last line of stdout is one JSON object with all the figures.

Data: LLMBar's ``[{"input", "output_1", "output_2", "label": 1|2}]``; pair records
``{"prompt", "chosen", "rejected"}`` (shown in a seeded random order, so a judge that always
picks the first slot scores 0.5, not 1.0); or ``--task-pairs N``: pairs of the embedded task,
a correct response against a flawed one, labelled by the task's oracle.
"""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from rlhfkit.bias import DEFAULT_MAX_POSITION_BIAS, position_bias as order_bias
from rlhfkit.config import ConfigError
from rlhfkit.data.loading import DataError, iter_records, require
from rlhfkit.io import atomic_write_jsonl
from rlhfkit.judges.agreement import agreement_between, agreement_with_labels, position_bias
from rlhfkit.judges.config import load_judge_config
from rlhfkit.judges.prompt import Judgment
from rlhfkit.judges.spec import from_spec
from rlhfkit.tasks import JUDGES as TASK_JUDGES
from rlhfkit.tasks.arith import demonstration, format_prompt, gold_response, make_problems
from rlhfkit.tasks.arith_judge import preference_prob


def add_arguments(p) -> None:
    p.add_argument("--judge", required=True, help="judge config YAML (see configs/judge_*.yaml)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="LLMBar .json or pair records {prompt, chosen, rejected}")
    src.add_argument("--task-pairs", type=int, metavar="N", help="N pairs from the embedded task, labelled by its oracle")
    p.add_argument("--seed", type=int, default=0, help="order of pair records; problems of --task-pairs")
    p.add_argument("--limit", type=int, default=None, help="judge only the first N pairs")
    p.add_argument("--out", help="write each pair's judgment (with rationales) to this JSONL file")
    p.add_argument("--against", metavar="CONFIG", help="a second judge config: also report judge-vs-judge agreement")
    p.add_argument("--max-position-bias", type=float, default=DEFAULT_MAX_POSITION_BIAS, metavar="SHARE",
                   help="the share of order-decided verdicts above which the label stage refuses this judge "
                        "without order averaging (label.max_position_bias); reported, never refused here")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="judge config overrides")


def load_pairs(path: str | Path, seed: int = 0) -> list[dict]:
    """Records ``{"prompt", "a", "b", "a_preferred", "meta"?}`` from LLMBar or pair files."""
    rng = random.Random(seed)
    out = []
    for rec in iter_records(path):
        r = rec.record
        if "output_1" in r or "label" in r:
            require(rec, {"input": str, "output_1": str, "output_2": str, "label": int}, nonempty=("input",))
            if r["label"] not in (1, 2) or isinstance(r["label"], bool):
                raise DataError(f"{rec.where}: field 'label' must be 1 or 2, got {r['label']!r}")
            out.append({"prompt": r["input"], "a": r["output_1"], "b": r["output_2"], "a_preferred": r["label"] == 1})
        else:
            require(rec, {"prompt": str, "chosen": str, "rejected": str}, nonempty=("prompt",))
            if r["chosen"] == r["rejected"]:
                raise DataError(f"{rec.where}: 'chosen' and 'rejected' are the same text")
            chosen_first = rng.random() < 0.5
            a, b = (r["chosen"], r["rejected"]) if chosen_first else (r["rejected"], r["chosen"])
            item = {"prompt": r["prompt"], "a": a, "b": b, "a_preferred": chosen_first}
            if isinstance(r.get("meta"), dict):
                item["meta"] = r["meta"]
            out.append(item)
    if not out:
        raise DataError(f"{path}: no records")
    return out


def task_pairs(n: int, seed: int) -> list[dict]:
    """Embedded-task pairs: the gold response against a flawed one (a slip or an invented number).

    The label is the oracle's (P > 0.5), and the order is shuffled with ``seed``.
    """
    rng = random.Random(seed)
    out = []
    for p in make_problems(n, seed=seed, unanswerable_frac=0.3):
        gold, bad = gold_response(p), demonstration(p, rng, hallucination_rate=1.0, slip_rate=1.0)
        if gold == bad:
            continue
        a, b = (gold, bad) if rng.random() < 0.5 else (bad, gold)
        prompt = format_prompt(p)
        out.append({"prompt": prompt, "a": a, "b": b, "a_preferred": preference_prob(p, a, b, 10.0) > 0.5,
                    "meta": p.to_meta()})
    return out


def evaluate(judge, pairs: list[dict]) -> tuple[list, dict]:
    """Judge every pair in both orders; return the judgments and the figures."""
    items = [(p["prompt"], p["a"], p["b"]) for p in pairs]
    if hasattr(judge, "judge"):
        judgments = judge.judge(items, both_orders=True)
    else:  # any PreferenceFunction: ask the swapped order explicitly
        first = judge.prob(items)
        swapped = judge.prob([(q, b, a) for q, a, b in items])
        judgments = [Judgment(prob=0.5 * (p + 1 - s), prob_a_first=p, prob_a_second=1 - s) for p, s in zip(first, swapped)]
    gold = [p["a_preferred"] for p in pairs]
    averaged = [0.5 * (j.prob_a_first + j.prob_a_second) for j in judgments]
    bias = position_bias(judgments)
    figures = {
        "n": len(pairs),
        "agreement_single_order": agreement_with_labels([j.prob_a_first for j in judgments], gold),
        "agreement_swapped_order": agreement_with_labels([j.prob_a_second for j in judgments], gold),
        "agreement_averaged": agreement_with_labels(averaged, gold),
        "ties_averaged": sum(1 for p in averaged if p == 0.5),
        "position_bias": bias["rate"],
        "first_slot_rate": bias["first_slot_rate"],
        "position_undecided": bias["n_undecided"],
        # P(first slot wins) averaged over both orders: 1 − prob_a_second is P(b ≻ a) asked with b first.
        "first_slot_preference": order_bias([j.prob_a_first for j in judgments],
                                            [1 - j.prob_a_second for j in judgments])["first_slot_preference"],
    }
    return judgments, figures


def run(args) -> int:
    cfg = load_judge_config(args.judge, args.overrides)
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit must be >= 1")
    if args.task_pairs is not None:
        if args.task_pairs < 1:
            raise ConfigError("--task-pairs must be >= 1")
        pairs, source = task_pairs(args.task_pairs, args.seed), f"embedded task ({args.task_pairs} problems, seed {args.seed})"
    else:
        pairs, source = load_pairs(args.data, args.seed), args.data
    if args.limit is not None:
        pairs = pairs[: args.limit]
    t0 = time.time()
    try:
        judge = from_spec(cfg, pairs, task_judges=TASK_JUDGES)
    except ValueError as e:
        raise ConfigError(f"{args.judge}: {e}") from None
    t_load = time.time() - t0
    judgments, fig = evaluate(judge, pairs)
    if args.against:
        other_cfg = load_judge_config(args.against)
        try:
            other = from_spec(other_cfg, pairs, task_judges=TASK_JUDGES)
        except ValueError as e:
            raise ConfigError(f"{args.against}: {e}") from None
        other_judgments, other_fig = evaluate(other, pairs)
        pick = (lambda j, avg: j.prob_a_first if not avg else 0.5 * (j.prob_a_first + j.prob_a_second))
        fig["against"] = {"judge": getattr(other, "name", other_cfg.kind.value), "agreement": other_fig["agreement_averaged"]
                          if other_cfg.average_orders else other_fig["agreement_single_order"],
                          "judge_vs_judge": agreement_between([pick(j, cfg.average_orders) for j in judgments],
                                                              [pick(j, other_cfg.average_orders) for j in other_judgments])}
    seconds = time.time() - t0
    fig["max_position_bias"] = args.max_position_bias
    fig["position_bias_over_max"] = fig["position_bias"] > args.max_position_bias
    headline = fig["agreement_averaged"] if cfg.average_orders else fig["agreement_single_order"]
    result = {"judge": getattr(judge, "name", cfg.kind.value), "data": str(source), "average_orders": cfg.average_orders,
              "cot": cfg.cot, "agreement": headline, **fig, "load_seconds": round(t_load, 1), "seconds": round(seconds, 1)}
    if args.out:
        atomic_write_jsonl(Path(args.out), [{**p, **j.to_dict()} for p, j in zip(pairs, judgments)])
    print(f"judge: {result['judge']}   data: {source}   n={fig['n']}   ({seconds:.0f} s, load {t_load:.0f} s)")
    print(f"{'':34}agreement")
    print(f"{'first order only (no averaging)':34}{fig['agreement_single_order']:.3f}")
    print(f"{'swapped order only':34}{fig['agreement_swapped_order']:.3f}")
    print(f"{'both orders averaged':34}{fig['agreement_averaged']:.3f}   ({fig['ties_averaged']} ties, half credit)")
    print(f"position bias (verdict flips with the order): {fig['position_bias']:.3f}   "
          f"first slot wins: {fig['first_slot_rate']:.3f}   mean P(first slot): {fig['first_slot_preference']:.3f}")
    if fig["position_bias_over_max"]:
        print(f"  above max_position_bias {args.max_position_bias}: the label stage refuses this judge without "
              f"order averaging (average_orders: false)")
    if "against" in fig:
        a = fig["against"]
        print(f"against {a['judge']}: its agreement with the labels {a['agreement']:.3f}; "
              f"the two judges agree on {a['judge_vs_judge']:.3f} of the pairs")
    print(json.dumps(result))
    sys.stdout.flush()
    return 0
