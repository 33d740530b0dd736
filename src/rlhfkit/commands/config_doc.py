"""``rlhfkit config``: every pipeline config key with its type, default and meaning."""
from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--section", default="", help="only keys under this section, e.g. sft")


def run(args) -> int:
    from rlhfkit.config import describe
    from rlhfkit.pipeline import PipelineConfig

    for line in describe(PipelineConfig):
        if not args.section or line.startswith(args.section + "."):
            print(line)
    return 0
