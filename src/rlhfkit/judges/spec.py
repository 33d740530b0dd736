"""The one judge factory: a judge named by a string, as a :class:`~rlhfkit.judges.base.PreferenceFunction`.

``rlhfkit label`` (``label.judge``) and ``rlhfkit eval`` (``eval.judge``) both build their judge
here, so a judge that labels is a judge that evaluates, named the same way:

- ``oracle``: the embedded task's answer key (needs records carrying ``meta``);
- ``intransitive``: the oracle plus the answer-style cycle of :mod:`rlhfkit.judges.intransitive`
  (needs ``meta`` too);
- a reward-model directory (``scalar_head.json``; an ensemble directory with ``ensemble.json``):
  P(a ≻ b) = σ(r(a) − r(b)); a pairwise preference-model directory (``preference_model.json``);
- a judge YAML file (``JudgeConfig``: ``kind: llm`` a local LLM judge, ``kind: http`` an
  OpenAI-compatible endpoint, ``kind: oracle``), built by :func:`rlhfkit.judges.config.build_judge`.

Paths follow the one path rule (:mod:`rlhfkit.paths`): ``stage:reward/rm`` names the run's reward
model (under ``base_dir``, the run directory a stage passes); any other path is used as given (a
config file's relative paths were anchored to its directory by the loader).
A spec that names no judge raises :class:`~rlhfkit.config.ConfigError` (a ValueError), naming the
spec and the accepted forms, so the command line prints it as an error rather than a traceback.
"""
from __future__ import annotations

from pathlib import Path

from rlhfkit.config import ConfigError
from rlhfkit.judges.base import PreferenceFunction
from rlhfkit.paths import STAGE_PREFIX, run_path, stage_hint

ACCEPTED = ("'oracle', 'intransitive', a reward-model directory (scalar_head.json or ensemble.json), "
            "a preference-model directory (preference_model.json), or a judge YAML file (kind: llm, http or oracle)")
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def resolve_spec_path(spec: str, base_dir: Path | None = None) -> Path:
    """The path a spec names: ``stage:NAME/sub`` is ``base_dir``/NAME/sub (the run directory), else as given."""
    if spec.startswith(STAGE_PREFIX) and base_dir is None:
        raise ConfigError(f"judge {spec!r}: a {STAGE_PREFIX} path names a stage's output, and there is no run here")
    return run_path(base_dir, spec)


def from_spec(spec: str, records: list[dict] | None = None, base_dir: Path | None = None, device=None, *,
              beta: float = 10.0, gamma: float = 3.0) -> PreferenceFunction:
    """Build the judge ``spec`` names (see the module docstring for the accepted forms).

    ``records``: dicts with ``prompt`` and ``meta`` (the oracle's answer key; other judges ignore
    them). ``device``: where a reward or preference model runs. ``beta`` and ``gamma``: the
    oracle's and intransitive judge's sharpness and style weight.
    """
    spec = str(spec).strip()
    if spec == "oracle":
        from rlhfkit.judges.config import JudgeConfig, JudgeKind, build_judge

        return build_judge(JudgeConfig(kind=JudgeKind.ORACLE, beta=beta), records)
    if spec == "intransitive":
        from rlhfkit.judges.intransitive import IntransitiveJudge

        metas = [r for r in (records or []) if isinstance(r.get("meta"), dict)]
        if not metas:
            raise ValueError("the intransitive judge needs records of the embedded task (each with 'meta')")
        return IntransitiveJudge.from_records(metas, beta=beta, gamma=gamma)
    if not spec:
        raise ConfigError(f"no judge given; a judge is {ACCEPTED}")
    path = resolve_spec_path(spec, base_dir)
    if path.is_dir():
        return _model_judge(spec, path, device)
    if path.is_file() and path.suffix.lower() in CONFIG_SUFFIXES:
        from rlhfkit.config import load_config
        from rlhfkit.judges.config import JudgeConfig, build_judge

        return build_judge(load_config(JudgeConfig, path), records)
    where = stage_hint(spec, base_dir) if base_dir is not None else ""
    what = "is not a judge config file" if path.is_file() else "is neither a known judge name nor an existing path"
    raise ConfigError(f"judge {spec!r} {what}{where}; a judge is {ACCEPTED}")


def _model_judge(spec: str, path: Path, device) -> PreferenceFunction:
    from rlhfkit.judges.preference_model import MARKER
    from rlhfkit.models.reward import HEAD_JSON

    if (path / MARKER).exists():
        from rlhfkit.judges.preference_model import load_preference_model

        return load_preference_model(path, device=device)
    if (path / HEAD_JSON).exists() or (path / "ensemble.json").exists():
        from rlhfkit.judges.reward_model import RewardModelPreference

        return RewardModelPreference(path, device=device)
    raise ConfigError(f"judge {spec!r}: {path} is a directory but not a reward or preference model (no {HEAD_JSON}, "
                     f"ensemble.json or {MARKER}; a policy model is no judge: wrap it in a judge YAML, kind: llm); "
                     f"a judge is {ACCEPTED}")
