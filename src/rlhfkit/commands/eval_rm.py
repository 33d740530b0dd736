"""``rlhfkit eval-rm --model DIR --data FILE`` and ``rlhfkit eval-prm --model DIR --data FILE``.

eval-rm: pair accuracy (ties count as wrong), mean margin r_c − r_r, expected calibration error of
σ(r_c − r_r), on any pair file the reward loader reads (pairs, HH transcripts, rankings); and its length
bias (``length_bias``, lengths in tokens of the response by the model's tokenizer): the accuracy of
always picking the longer / shorter response, the model's accuracy where the chosen one is longer /
shorter, and Spearman's ρ between score and length.
eval-prm: step accuracy at 0.5, ROC-AUC and the always-majority baseline on rated steps.
Each prints a table, then one JSON object as the last line of standard output.
"""
from __future__ import annotations

import json
import time

from rlhfkit.data.preferences import load_pairs, load_steps
from rlhfkit.models.reward_eval import (
    pair_length_bias, pair_metrics, rated_step_metrics, response_token_lengths, score_each_once,
)


def add_arguments_for(name: str, p) -> None:
    p.add_argument("--model", required=True, help="a reward-model directory (OUT/reward/rm, .../prm)")
    p.add_argument("--data", required=True, help="pair / ranking / HH file (eval-rm) or step-labelled file (eval-prm)")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per forward pass")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N records (0 = all)")
    if name == "eval-prm":
        p.add_argument("--ambiguous", default="drop", choices=("drop", "positive", "negative"),
                       help="how a PRM800K rating 0 counts")


def _table(rows: dict) -> str:
    width = max(len(k) for k in rows)
    return "\n".join(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in rows.items())


def _length_lines(lb: dict) -> str:
    """The length-bias figures as lines of text (None, an empty subset, as –)."""
    f = lambda v: "–" if v is None or v != v else f"{v:.4f}"  # noqa: E731  (v != v: NaN)
    b, sp = lb["baselines"], lb["split"]
    return "\n".join([
        f"length bias (lengths in {lb['unit']} of the response)",
        f"  length-only baselines: longer wins {f(b['longer_wins'])}, shorter wins {f(b['shorter_wins'])} "
        f"(length ties {f(b['ties'])}, counted half)",
        f"  accuracy where chosen is longer {f(sp['chosen_longer']['accuracy'])} (n={sp['chosen_longer']['n']}), "
        f"shorter {f(sp['chosen_shorter']['accuracy'])} (n={sp['chosen_shorter']['n']})",
        f"  Spearman rho(score, length) over the responses {f(lb['spearman_score_length'])}"])


def run(args) -> int:
    # lazy (here and below): torch and transformers, which this command's --help does not need
    from rlhfkit.models.reward_files import load_reward_model

    t0 = time.time()
    if args.command == "eval-rm":
        loaded = load_pairs(args.data)  # validated before the model loads
        pairs = loaded.pairs[: args.limit] if args.limit else loaded.pairs
        model = load_reward_model(args.model, batch_size=args.batch_size)
        texts = [t for p in pairs for t in ((p.prompt, p.chosen), (p.prompt, p.rejected))]
        s = score_each_once(model.score, texts)
        result = pair_metrics(s[0::2], s[1::2])
        result["skipped"] = len(loaded.skipped)
        lengths = response_token_lengths(model.tokenizer, [r for _, r in texts])
        result["length_bias"] = pair_length_bias(s[0::2], s[1::2], lengths[0::2], lengths[1::2], texts)
    else:
        from rlhfkit.models.reward import step_logits

        recs = load_steps(args.data, args.ambiguous)
        recs = recs[: args.limit] if args.limit else recs
        model = load_reward_model(args.model, batch_size=args.batch_size)
        needed = [[v is not None for v in r.labels] for r in recs]
        logits = step_logits(model.net, model.tokenizer, [r.prompt for r in recs], [list(r.steps) for r in recs],
                             args.batch_size, model.device, needed=needed)
        result = rated_step_metrics(logits, [r.labels for r in recs])
    result["runtime_s"] = round(time.time() - t0, 1)
    print(_table({k: v for k, v in result.items() if k != "length_bias"}))
    if "length_bias" in result:
        print(_length_lines(result["length_bias"]))
    print(json.dumps(result))
    return 0
