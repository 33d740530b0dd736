"""The one judge factory: a judge named by a spec, as a :class:`~rlhfkit.judges.base.PreferenceFunction`.

Every stage and command that needs a judge builds it here (``label.judge``, ``eval.judge``,
``dno.judge``, ``rlhfkit judge-eval --judge``), so a judge that labels is a judge that evaluates,
named the same way:

- a name of ``task_judges``, the judges a task brings (the embedded task's :data:`rlhfkit.tasks.JUDGES`:
  ``oracle``, its answer key, P(a ≻ b) = σ(beta · (score_a − score_b)), and ``intransitive``, the
  oracle plus an answer-style cycle); they need records carrying the task's ``meta``. The caller
  passes them in (the recipes do), so this factory, like all of the foundation, never imports a task;
- a reward-model directory (``scalar_head.json``; an ensemble directory with ``ensemble.json``):
  P(a ≻ b) = σ(r(a) − r(b)); a pairwise preference-model directory (``preference_model.json``);
- ``bt:DIR`` or ``pm:DIR``: the same, saying which of the two DIR must be (DNO's spelling);
- a judge YAML file (:class:`~rlhfkit.judges.config.JudgeConfig`: ``kind: llm`` a local LLM
  judge, ``kind: http`` an OpenAI-compatible endpoint, ``kind: oracle``), read by
  :func:`~rlhfkit.judges.config.load_judge_config`; or such a config already loaded.

Paths follow the one path rule (:mod:`rlhfkit.paths`): ``stage:reward/rm`` names the run's reward
model (under ``base_dir``, the run directory a stage passes); any other path is used as given (a
config file's relative paths were anchored to its directory by the loader).
A spec that names no judge raises :class:`~rlhfkit.config.ConfigError` (a ValueError), naming the
spec and the accepted forms, so the command line prints it as an error rather than a traceback.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

from rlhfkit.config import ConfigError
from rlhfkit.judges.base import PreferenceFunction
from rlhfkit.judges.config import JudgeConfig, JudgeKind, load_judge_config
from rlhfkit.judges.prompt import prompt_from_files
from rlhfkit.judges.reward_model import RewardModelPreference
from rlhfkit.paths import STAGE_PREFIX, run_path, stage_hint

ACCEPTED = ("'oracle', 'intransitive', a reward-model directory (scalar_head.json or ensemble.json), "
            "a preference-model directory (preference_model.json), bt:DIR or pm:DIR, "
            "or a judge YAML file (kind: llm, http or oracle)")
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
# A task's named judges: name → build(records with ``meta``, beta, gamma) → PreferenceFunction.
TaskJudges = Mapping[str, Callable[[Sequence[dict], float, float], PreferenceFunction]]
# ``bt:DIR`` / ``pm:DIR``: the model kind DIR must hold (auto-detected when DIR is given alone).
MODEL_PREFIXES = ("bt", "pm")


def resolve_spec_path(spec: str, base_dir: Path | None = None) -> Path:
    """The path a spec names: ``stage:NAME/sub`` is ``base_dir``/NAME/sub (the run directory), else as given."""
    if spec.startswith(STAGE_PREFIX) and base_dir is None:
        raise ConfigError(f"judge {spec!r}: a {STAGE_PREFIX} path names a stage's output, and there is no run here")
    return run_path(base_dir, spec)


def from_spec(spec: str | JudgeConfig, records: Sequence[dict] | None = None, base_dir: Path | None = None,
              device=None, *, beta: float = 10.0, gamma: float = 3.0,
              overrides: Sequence[str] = (), task_judges: TaskJudges | None = None) -> PreferenceFunction:
    """Build the judge ``spec`` names (see the module docstring for the accepted forms).

    ``records``: dicts with ``prompt`` and ``meta`` (the task judges' answer key; other judges
    ignore them). ``device``: where a reward or preference model runs. ``beta`` and ``gamma``: the
    ``oracle``'s and ``intransitive`` judge's sharpness and style weight (a judge YAML carries its
    own). ``overrides``: ``key=value`` settings applied to a judge YAML file. ``task_judges``: the
    judges a task names (``rlhfkit.tasks.JUDGES``), for ``oracle``, ``intransitive`` and ``kind: oracle``.
    """
    task_judges = task_judges or {}
    if isinstance(spec, JudgeConfig):
        return _from_config(spec, records, task_judges)
    spec = str(spec).strip()
    if overrides and not _is_config_file(resolve_spec_path(spec, base_dir)):
        raise ConfigError(f"judge {spec!r}: key=value overrides apply to a judge YAML file only")
    if spec in task_judges:
        return _task_judge(spec, task_judges, records, beta, gamma)
    if not spec:
        raise ConfigError(f"no judge given; a judge is {ACCEPTED}")
    kind, colon, rest = spec.partition(":")
    if colon and kind in MODEL_PREFIXES:
        path = resolve_spec_path(rest, base_dir)
        if not rest or not path.is_dir():
            raise ConfigError(f"judge {spec!r}: {path} is not a directory{_hint(rest, base_dir)}; "
                              f"a judge is {ACCEPTED}")
        return _model_judge(spec, path, device, kind)
    path = resolve_spec_path(spec, base_dir)
    if path.is_dir():
        return _model_judge(spec, path, device)
    if _is_config_file(path):
        return _from_config(load_judge_config(path, overrides), records, task_judges)
    what = "is not a judge config file" if path.is_file() else "is neither a known judge name nor an existing path"
    raise ConfigError(f"judge {spec!r} {what}{_hint(spec, base_dir)}; a judge is {ACCEPTED}")


def _is_config_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in CONFIG_SUFFIXES


def _hint(ref: str, base_dir: Path | None) -> str:
    """Where a relative path that is missing here exists in the run: say to write it ``stage:...``."""
    return stage_hint(ref, base_dir) if base_dir is not None else ""


def _task_judge(name: str, task_judges: TaskJudges, records: Sequence[dict] | None, beta: float,
                gamma: float) -> PreferenceFunction:
    """The task judge ``name`` (the oracle or the intransitive judge) from the records that carry the task ``meta``."""
    if name not in task_judges:
        raise ConfigError(f"judge {name!r} is a task's judge, and this command was given no task judges")
    metas = [r for r in (records or []) if isinstance(r.get("meta"), dict)]
    if not metas:
        raise ValueError(f"the {name} judge needs records of the embedded task (each with 'meta')")
    return task_judges[name](metas, beta, gamma)


def _from_config(cfg: JudgeConfig, records: Sequence[dict] | None, task_judges: TaskJudges) -> PreferenceFunction:
    """The judge a :class:`JudgeConfig` describes. The oracle needs ``records`` carrying ``meta``."""
    if cfg.kind in (JudgeKind.LLM, JudgeKind.HTTP) and not cfg.model:
        raise ValueError(f"a {cfg.kind.value} judge needs 'model'")
    if cfg.kind is JudgeKind.ORACLE:
        return _task_judge("oracle", task_judges, records, cfg.beta, 0.0)
    prompt = prompt_from_files(cfg.rubric_file, cfg.constitution_file, tuple(cfg.labels))
    if cfg.kind is JudgeKind.LLM:
        from rlhfkit.judges.llm import LLMJudge  # transformers and torch: only for the judge that needs them

        return LLMJudge.from_pretrained(cfg.model, cfg.gguf_file, prompt=prompt, average_orders=cfg.average_orders,
                                        cot=cfg.cot, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    from rlhfkit.judges.http import HTTPJudge  # only an HTTP judge needs it

    return HTTPJudge.from_config(cfg, prompt)


def _model_judge(spec: str, path: Path, device, kind: str | None = None) -> PreferenceFunction:
    """A trained model in ``path`` as a judge: ``kind`` "pm" (pairwise), "bt" (reward model) or None (detect)."""
    # torch and transformers: only for the judges that are models
    from rlhfkit.judges.preference_model import MARKER, load_preference_model
    from rlhfkit.models.reward import HEAD_JSON

    pairwise = (path / MARKER).exists()
    scalar = (path / HEAD_JSON).exists() or (path / "ensemble.json").exists()
    if kind == "pm" and not pairwise or kind == "bt" and not scalar:
        what = (f"a pairwise preference model (no {MARKER})" if kind == "pm"
                else f"a reward model (no {HEAD_JSON} or ensemble.json)")
        raise ConfigError(f"judge {spec!r}: {path} is not {what}; a judge is {ACCEPTED}")
    if kind == "pm" or (kind is None and pairwise):
        return load_preference_model(path, device=device)
    if scalar:
        return RewardModelPreference(path, device=device)
    raise ConfigError(f"judge {spec!r}: {path} is a directory but not a reward or preference model (no {HEAD_JSON}, "
                      f"ensemble.json or {MARKER}; a policy model is no judge: wrap it in a judge YAML, kind: llm); "
                      f"a judge is {ACCEPTED}")
