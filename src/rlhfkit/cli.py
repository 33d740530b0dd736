"""The ``rlhfkit`` command line.

Each subcommand lives in its own module, which defines ``add_arguments(parser)`` and
``run(args) -> int``; this file only lists them. Only the module of the command given is
imported (for its arguments, then to run it), so ``rlhfkit --help`` imports no recipe and no
torch, and a command's heavy imports load only when it runs.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from rlhfkit.config import ConfigError
from rlhfkit.data.loading import DataError
from rlhfkit.io import RunLocked
from rlhfkit.models.local import ModelNotFound
from rlhfkit.nonfinite import TrainingDiverged

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("rlhfkit.pipeline", "run the stages a pipeline config names, in order, resuming completed ones"),
    "quickstart": ("rlhfkit.commands.quickstart", "run the bundled pipeline on the embedded default task"),
    "data": ("rlhfkit.commands.stage", "generate the embedded task's data (a pipeline stage)"),
    "pretrain": ("rlhfkit.commands.stage", "pretrain a causal LM on a text corpus (a pipeline stage)"),
    "sft": ("rlhfkit.commands.stage", "supervised fine-tuning on demonstrations (a pipeline stage)"),
    "eval": ("rlhfkit.commands.stage", "sample policies on held-out prompts and score them with a judge"),
    "label": ("rlhfkit.commands.stage", "sample K responses per prompt and judge them into a preference dataset (resumable)"),
    "reward": ("rlhfkit.commands.stage", "train reward, process (PRM), outcome and cost models (a pipeline stage)"),
    "eval-rm": ("rlhfkit.commands.eval_rm", "reward-model accuracy, margin and calibration on a pair file"),
    "eval-prm": ("rlhfkit.commands.eval_rm", "process-reward-model step accuracy and ROC-AUC on a step-labelled file"),
    "ppo": ("rlhfkit.commands.stage", "RL fine-tuning against a reward: PPO, GRPO or RLOO (a pipeline stage)"),
    "dpo": ("rlhfkit.commands.stage", "offline DPO / IPO / conservative DPO on preference pairs (a pipeline stage)"),
    "dno": ("rlhfkit.commands.stage", "Direct Nash Optimization: iterative contrastive self-improvement (a pipeline stage)"),
    "judge-eval": ("rlhfkit.commands.judge_eval", "measure a judge: agreement with gold labels and position bias"),
    "annotate": ("rlhfkit.commands.annotate", "human annotation: import items, add annotators, serve the web app, export rankings"),
    "import-model": ("rlhfkit.commands.import_model", "dequantize a .gguf checkpoint (or package:NAME) into a plain Hugging Face directory"),
    "serve": ("rlhfkit.serve", "serve a causal LM through an OpenAI-compatible chat-completions API"),
    "config": ("rlhfkit.commands.config_doc", "print every config key with its type, default and meaning"),
}


def _add_arguments(name: str, module: str, p: argparse.ArgumentParser) -> None:
    mod = importlib.import_module(module)
    if hasattr(mod, "add_arguments_for"):
        mod.add_arguments_for(name, p)
    else:
        mod.add_arguments(p)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser: every command listed, the arguments of ``command`` only (None: of every command)."""
    parser = argparse.ArgumentParser(prog="rlhfkit", description="Reinforcement learning from human feedback, end to end.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if command is None or name == command:
            _add_arguments(name, module, p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The command is the first argument that is not an option (the top level has only -h).
    command = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(command if command in COMMANDS else "")
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    mod = importlib.import_module(args._module)

    try:
        return int(mod.run(args) or 0)
    except (ConfigError, DataError, ModelNotFound, RunLocked, TrainingDiverged) as e:
        print(f"rlhfkit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
