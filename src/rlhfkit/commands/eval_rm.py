"""``rlhfkit eval-rm --model DIR --data FILE`` and ``rlhfkit eval-prm --model DIR --data FILE``.

eval-rm: pair accuracy (ties count as wrong), mean margin r_c − r_r, expected calibration error of
σ(r_c − r_r), on any pair file the reward loader reads (pairs, HH transcripts, rankings).
eval-prm: step accuracy at 0.5, ROC-AUC and the always-majority baseline on rated steps.
Each prints a table, then one JSON object as the last line of standard output.
"""
from __future__ import annotations

import json
import time

from rlhfkit.data.preferences import load_pairs, load_steps
from rlhfkit.models.reward_eval import pair_metrics, rated_step_metrics, score_each_once


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


def run(args) -> int:
    # lazy (here and below): torch and transformers, which this command's --help does not need
    from rlhfkit.models.reward_files import load_reward_model

    t0 = time.time()
    if args.command == "eval-rm":
        loaded = load_pairs(args.data)  # validated before the model loads
        pairs = loaded.pairs[: args.limit] if args.limit else loaded.pairs
        model = load_reward_model(args.model, batch_size=args.batch_size)
        s = score_each_once(model.score, [t for p in pairs for t in ((p.prompt, p.chosen), (p.prompt, p.rejected))])
        result = pair_metrics(s[0::2], s[1::2])
        result["skipped"] = len(loaded.skipped)
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
    print(_table(result))
    print(json.dumps(result))
    return 0
