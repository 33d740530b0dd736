"""Seeds: a stage run once per seed, and its figures as mean ± sd over seeds.

A stage whose config lists ``seeds: [0, 1, 2]`` (the RL stages, dpo, dno) runs its recipe once per seed,
``seed`` replaced by it (:func:`run_seeds`, called by ``pipeline.run_stage``). Each run is a whole
single-run output in its own directory, and its resume state has its own place beside it:

    OUT/ppo/seed_0/{model, log.jsonl, metrics.json, ...}   one seed's output (dno: its dno_<t>/ too)
    OUT/ppo/metrics.json                                  {"seeds_run": [0, 1, 2], "seeds": {"0": {...}, ...},
                                                           "policies": the seeds' figures aggregated}
    OUT/ppo.ckpt/seed_0/                                  seed 0's mid-run checkpoint (checkpoints.checkpoint_dir)
    OUT/ppo.ckpt/seed_0.done/                             seed 0 finished (save_every > 0): a restarted stage
                                                          copies it back instead of training it again

The eval stage evaluates a policy that names a seeded stage's output (``ppo: stage:ppo/model``) once per seed
(:func:`expand_policies`: ``ppo@seed0: stage:ppo/seed_0/model``, ...) and reports, beside each seed's
figures, the aggregate ``ppo`` (:func:`aggregate_policies`). Any other config field naming a seeded stage's
output outside a ``seed_<s>/`` directory is ambiguous and refused (:func:`check_references`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from rlhfkit.checkpoints import checkpoint_config, checkpoint_dir
from rlhfkit.config import ConfigError, to_dict
from rlhfkit.io import JsonlLog, atomic_write_json, partial_dir, replace_dir
from rlhfkit.paths import STAGE_PREFIX, map_config_paths

_SEED_NAME = re.compile(r"(.+)@seed(-?\d+)")
# Student t quantiles t_{0.975, df} for df = 1 … 30 (the 95% interval of a mean over few seeds).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def seed_dir(seed: int) -> str:
    """The directory of one seed's run inside its stage's: ``seed_<s>``."""
    return f"seed_{seed}"


def check_seeds(seeds: tuple[int, ...]) -> None:
    """Empty (one run with ``seed``), or at least two distinct seeds (a spread needs two)."""
    if len(seeds) == 1:
        raise ValueError(f"seeds: {list(seeds)} is one run; list two or more seeds, or set seed instead")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: {list(seeds)} repeats a seed")


# ---------------------------------------------------------------- running a stage once per seed

def run_seeds(run: Callable[..., dict], cfg, ctx) -> dict:
    """Run a stage's recipe ``run(cfg, ctx)`` once per seed of ``cfg.seeds``, each with ``seed`` replaced and
    ``seeds`` emptied, in ``ctx.stage_dir/seed_<s>`` with its own log; returns the stage's metrics:
    ``{"seeds_run": [...], "seeds": {"<s>": that run's metrics}}``, plus ``policies`` aggregated over seeds
    when the runs report any (an RL stage's ``kl_from_reference``).

    With checkpoints on (``save_every`` > 0) a finished seed is kept in ``OUT/<stage>.ckpt/seed_<s>.done``,
    so that a restarted stage copies it back instead of training it again (a kept seed of another config
    is refused, as a checkpoint is).
    """
    acc, main = ctx.accelerator, ctx.accelerator.is_main_process
    per_seed: dict[str, dict] = {}
    for i, seed in enumerate(cfg.seeds, start=1):
        one = dataclasses.replace(cfg, seed=seed, seeds=())
        sub_dir = ctx.stage_dir / seed_dir(seed)
        ckpt = checkpoint_dir(sub_dir)  # OUT/<stage>.ckpt/seed_<s>; None outside a stage directory
        kept = ckpt.with_name(ckpt.name + ".done") if ckpt is not None else None
        acc.print(f"[rlhfkit] {ctx.name}: seed {seed} ({i} of {len(cfg.seeds)})")
        if kept is not None and (kept / "meta.json").exists():
            per_seed[str(seed)] = _restore(kept, sub_dir, one, acc)
            acc.print(f"[rlhfkit] {ctx.name}: seed {seed} trained to the end before the restart ({kept}), not trained again")
            continue
        if main:
            sub_dir.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        log = JsonlLog(sub_dir / "log.jsonl", enabled=main, accelerator=acc)
        try:
            metrics = run(one, dataclasses.replace(ctx, stage_dir=sub_dir, log=log))
        finally:
            log.close()
        if main:
            atomic_write_json(sub_dir / "metrics.json", metrics)
            if kept is not None and getattr(one, "save_every", 0) > 0:
                _keep(sub_dir, kept, one)
                shutil.rmtree(ckpt, ignore_errors=True)  # the seed's mid-run checkpoint is spent
        acc.wait_for_everyone()
        per_seed[str(seed)] = json.loads(json.dumps(metrics))  # as the file holds it (tuples as lists)
    result: dict[str, Any] = {"seeds_run": list(cfg.seeds), "seeds": per_seed}
    common = set.intersection(*(set(m.get("policies", {})) for m in per_seed.values()))
    if common:
        result["policies"] = {name: aggregate_metrics([m["policies"][name] for m in per_seed.values()])
                              for name in per_seed[str(cfg.seeds[0])]["policies"] if name in common}
    return result


def _keep(sub_dir: Path, kept: Path, cfg) -> None:
    tmp = partial_dir(kept)
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(sub_dir, tmp / "output")
    atomic_write_json(tmp / "meta.json", {"config": checkpoint_config(cfg)})
    replace_dir(tmp, kept)


def _restore(kept: Path, sub_dir: Path, cfg, acc) -> dict:
    saved = json.loads((kept / "meta.json").read_text())["config"]
    now = checkpoint_config(cfg)
    if saved != now:
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise ConfigError(f"{kept / 'meta.json'}: seed {cfg.seed} finished with a different config "
                          f"({', '.join(changed)}); remove {kept.parent} to start the stage over")
    if acc.is_main_process:
        if sub_dir.exists():
            shutil.rmtree(sub_dir)
        shutil.copytree(kept / "output", sub_dir)
    acc.wait_for_everyone()
    return json.loads((kept / "output" / "metrics.json").read_text())


# ---------------------------------------------------------------- figures over seeds

def t_quantile_975(df: int) -> float:
    """Student's t_{0.975, df}: the table for df ≤ 30, beyond it the Cornish-Fisher expansion around z = 1.96
    (within 0.001 of the exact quantile there)."""
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def over_seeds(figures: list) -> dict:
    """One figure over seeds: each seed's ``{"mean", "ci95", "n", ...}`` (or a plain number) →
    ``{"mean", "sd", "seeds", "ci95", "n"}``: the mean of the seeds' means, their sample standard deviation
    (ddof = 1), the seeds' means in seed order, the Student-t 95% interval of the mean over seeds
    (mean ± t_{0.975, n−1}·sd/√n), and n, the number of seeds. Any other number of the figure (an LC win
    rate's ``length_coef``) is the mean of the seeds'. A seed without a value (mean None) leaves every
    figure None.

    Example: means 0.5, 0.6, 0.7 → mean 0.6, sd 0.1, ci95 0.6 ± 4.303·0.1/√3.
    """
    means = [f["mean"] if isinstance(f, dict) else f for f in figures]
    n = len(means)
    out: dict[str, Any] = {"mean": None, "sd": None, "seeds": means, "ci95": [None, None], "n": n}
    if n < 2 or any(m is None for m in means):
        return out
    mean = sum(means) / n
    sd = math.sqrt(sum((m - mean) ** 2 for m in means) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    out.update(mean=mean, sd=sd, ci95=[mean - half, mean + half])
    if all(isinstance(f, dict) for f in figures):
        for key in figures[0]:
            values = [f.get(key) for f in figures]
            if key not in out and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                out[key] = sum(values) / n
    return out


def aggregate_metrics(per_seed: list[dict]) -> dict:
    """One policy's metrics over seeds (each seed's ``{metric: figure}``): every metric all seeds report,
    through :func:`over_seeds`; a plain value equal in every seed (a setting such as ``cost_threshold``) as it is;
    a nested group of figures (eval's ``sampled``) likewise, group by group."""
    out = {}
    for key, first in per_seed[0].items():
        values = [m.get(key) for m in per_seed]
        if any(v is None for v in values):
            continue
        if not isinstance(first, dict) and all(v == first for v in values):
            out[key] = first
        elif all(isinstance(v, dict) and v and "mean" not in v for v in values):
            out[key] = aggregate_metrics(values)
        elif all(isinstance(v, dict) and "mean" in v or isinstance(v, (int, float)) and not isinstance(v, bool)
                 for v in values):
            out[key] = over_seeds(values)
    return out


# ---------------------------------------------------------------- references to a seeded stage's outputs

def seeds_run(out: str | Path, stage: str) -> list[int]:
    """The seeds a completed stage ran with (its metrics.json ``seeds_run``); [] for a single run or none yet."""
    path = Path(out) / stage / "metrics.json"
    return json.loads(path.read_text()).get("seeds_run", []) if path.exists() else []


def _split(ref: str) -> tuple[str, str, str] | None:
    """(prefix, stage, rest) of a ``[kind:]stage:STAGE/rest`` reference (a judge's ``bt:`` prefix); None otherwise."""
    ref = str(ref)
    at = ref.find(STAGE_PREFIX)
    if at < 0 or (at and not ref[:at].endswith(":")):
        return None
    stage, _, rest = ref[at + len(STAGE_PREFIX):].partition("/")
    return ref[:at], stage, rest


def _in_seed_dir(rest: str) -> bool:
    return re.match(r"seed_-?\d+(/|$)", rest) is not None


def _one_seed(prefix: str, stage: str, seed: int, rest: str) -> str:
    return f"{prefix}{STAGE_PREFIX}{stage}/{seed_dir(seed)}/{rest}".rstrip("/")


def ambiguous(ref: str, seeded: dict[str, Any]) -> str | None:
    """Why ``ref`` is ambiguous (it names an output of a stage in ``seeded``, stage → its seeds, outside a
    ``seed_<s>/`` directory), with the reference to write instead; None when it is not."""
    parts = _split(ref)
    if parts is None or parts[1] not in seeded or _in_seed_dir(parts[2]):
        return None
    prefix, stage, rest = parts
    seeds = list(seeded[stage])
    return (f"{ref!r} is ambiguous: stage {stage} runs with seeds {seeds}, one output per seed in "
            f"OUT/{stage}/seed_<s>/; name one, e.g. {_one_seed(prefix, stage, seeds[0], rest)!r}")


def seeded_hint(ref: str, out: str | Path) -> str:
    """For the error of a missing ``stage:`` path: why, when it names a completed seeded stage's output
    outside its ``seed_<s>/`` directories (``"; ..."``), else ``""``."""
    parts = _split(ref)
    seeds = seeds_run(out, parts[1]) if parts is not None else []
    why = ambiguous(ref, {parts[1]: seeds}) if seeds else None
    return f"; {why}" if why else ""


def check_references(sections: dict[str, Any]) -> None:
    """Refuse a path field of any section (eval.policies excepted: it expands) that names the output of a
    stage whose section lists ``seeds``, outside a ``seed_<s>/`` directory. ``sections``: stage → config."""
    seeded = {stage: sec.seeds for stage, sec in sections.items() if getattr(sec, "seeds", ())}
    if not seeded:
        return
    for stage, section in sections.items():
        for f in dataclasses.fields(section):
            if (stage, f.name) == ("eval", "policies"):
                continue

            def check(value, kind, key=f"{stage}.{f.name}"):
                if (why := ambiguous(value, seeded)) is not None:
                    raise ValueError(f"{key}: {why}")
                return value

            map_config_paths(type(section), {f.name: to_dict(getattr(section, f.name))}, check)


def expand_policies(policies: dict[str, str], out: str | Path, reference: str | None = None) -> dict[str, str]:
    """eval.policies with each policy that names a seeded stage's output (``ppo: stage:ppo/model``, the stage's
    metrics.json listing ``seeds_run``) once per seed: ``ppo@seed0: stage:ppo/seed_0/model``, ... in seed order;
    ``stage:dno/dno_3/model`` becomes ``stage:dno/seed_0/dno_3/model``. Other policies are kept as they are.
    ``reference`` (the policy win rates are measured against) must be a single model."""
    expanded = {}
    for name, ref in policies.items():
        if _SEED_NAME.fullmatch(name):
            raise ConfigError(f"eval.policies.{name}: a name ending @seed<N> is how a seeded policy's seeds are named")
        parts = _split(ref) if str(ref).startswith(STAGE_PREFIX) else None
        seeds = seeds_run(out, parts[1]) if parts is not None else []
        if not seeds or _in_seed_dir(parts[2]):
            expanded[name] = ref
            continue
        _, stage, rest = parts
        if name == reference:
            raise ConfigError(f"eval.reference: policy {name!r} ({ref}) ran with seeds {seeds}; win rates need one "
                              f"reference: add a policy for one seed (e.g. {name}_0: {_one_seed('', stage, seeds[0], rest)}) "
                              f"and name it")
        for s in seeds:
            expanded[f"{name}@seed{s}"] = _one_seed("", stage, s, rest)
    return expanded


def aggregate_policies(results: dict[str, dict]) -> tuple[dict[str, dict], dict[str, dict]]:
    """Eval results of :func:`expand_policies`' names split into (policies, per_seed): each group
    ``name@seed<s>`` replaced by its aggregate ``name`` (:func:`aggregate_metrics`, in the group's place),
    and the groups' own figures, by their names, in ``per_seed``."""
    groups: dict[str, list[str]] = {}
    for name in results:
        m = _SEED_NAME.fullmatch(name)
        groups.setdefault(m[1] if m else name, []).append(name)
    policies, per_seed = {}, {}
    for name, members in groups.items():
        if members == [name]:
            policies[name] = results[name]
            continue
        policies[name] = aggregate_metrics([results[m] for m in members])
        per_seed.update({m: results[m] for m in members})
    return policies, per_seed
