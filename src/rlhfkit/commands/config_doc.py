"""``rlhfkit config``: every pipeline config key with its type, default and meaning."""
from __future__ import annotations

from rlhfkit.config import describe


def add_arguments(p) -> None:
    p.add_argument("--section", default="", help="only keys under this section, e.g. sft")


def run(args) -> int:
    # lazy: the pipeline imports every recipe and torch, which this command's --help does not need
    from rlhfkit.pipeline import PipelineConfig

    for line in describe(PipelineConfig):
        if not args.section or line.startswith(args.section + "."):
            print(line)
    return 0
