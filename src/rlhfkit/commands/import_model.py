"""``rlhfkit import-model SRC OUT``: a .gguf checkpoint (or ``package:NAME[/FILE]``) as a plain HF directory.

Stages do the same implicitly the first time they meet a GGUF reference (cached under the run's
``models/``); this command makes the directory once, for reuse across runs.
"""
from __future__ import annotations

from pathlib import Path

from rlhfkit.models.local import ModelNotFound, import_gguf, resolve_model


def add_arguments(p) -> None:
    p.add_argument("src", help="a .gguf file, a directory holding one, or package:NAME[/FILE.gguf]")
    p.add_argument("out", help="the Hugging Face directory to write (model + tokenizer)")


def run(args) -> int:
    out = Path(args.out)
    if out.exists():
        raise ModelNotFound(f"{out} already exists; import into a new directory")
    directory, gguf = resolve_model(args.src)
    if gguf is None:
        raise ModelNotFound(f"model '{args.src}' holds no .gguf file (a Hugging Face directory needs no import)")
    import_gguf(directory / gguf, out)
    print(f"[rlhfkit] imported {directory / gguf} -> {out}")
    return 0
