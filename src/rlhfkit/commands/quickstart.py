"""``rlhfkit quickstart [--out DIR]``: the bundled pipeline on the embedded default task."""
from __future__ import annotations

from pathlib import Path

BUNDLED = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


def add_arguments(p) -> None:
    p.add_argument("--out", default="runs/quickstart", help="output directory (default: runs/quickstart)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the bundled config")


def run(args) -> int:
    # lazy: the pipeline imports every recipe and torch, which this command's --help does not need
    from rlhfkit.pipeline import load_pipeline_config, run_pipeline

    cfg = load_pipeline_config(BUNDLED, [f"out={args.out}", *args.overrides])
    out = run_pipeline(cfg)
    print(f"[rlhfkit] report: {out / 'report.md'} and {out / 'report.html'}; figures: {out / 'summary.json'}")
    return 0
