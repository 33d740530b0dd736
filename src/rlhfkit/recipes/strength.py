"""The strength grid: policies of two strengths against reward models of two strengths, from two finished runs.

The mission asks for "a favorable balance between the strength of the training signal (reward models) and the
model being trained". Two finished runs of the embedded task (``configs/strength_grid.yaml``: the quickstart's
0.8M-parameter model pretrained from scratch, ``weak``, and the SmolLM2-135M transfer run, ``strong``) give a
2 × 2 grid, policy side × reward side; nothing is trained again but the short PPO runs of the curves:

    best-of-n   each side's SFT policy samples n responses to the same held-out prompts (once per policy);
                each side's RM, PRM (min and product of its step probabilities) and ORM pick one of them; beside
                them, majority vote over the final answers, the first sample, and the oracle's best of n
                (``tasks.arith_eval.rerank_picks``): one row per cell, accuracy mean [95% CI] over prompts
    curves      for the cells in ``curves`` (by default the two diagonal ones and the strong-RM, weak-policy
                one): a short PPO run (``recipes.ppo``, the policy side's ``rl`` settings) of that policy
                against that side's BT reward model; its log has the gold (oracle) score, the proxy reward and
                the KL of every rollout, which the report draws against sqrt(KL) with gold's peak marked
                (Gao et al., 2022, "Scaling laws for reward model overoptimization")

Reward models score text, with their own tokenizer, so a reward model of one side scores the other side's
policy as it is; the critic of a curve's PPO starts from its policy (``rl.critic_init``), since a critic must
read the policy's tokens. Writes in ``OUT/strength/``: ``best_of_n_<policy>.jsonl`` (each prompt's samples, their
correctness and every reward model's scores), ``ppo_<policy>_<reward>/`` (each curve's PPO output: config.yaml,
model, log.jsonl, metrics.json), and the metrics ``strength_grid`` and ``strength_curves`` that the report shows.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from rlhfkit.config import ConfigError, save_config
from rlhfkit.data.loading import iter_records
from rlhfkit.io import atomic_write_json, atomic_write_jsonl, read_jsonl_plain
from rlhfkit.models.reward_files import load_reward_model
from rlhfkit.paths import ConfigPath
from rlhfkit.recipes import ppo
from rlhfkit.recipes.ppo import PPOConfig
from rlhfkit.report_plots import gold_peak, overoptimization_points
from rlhfkit.scoring import RewardSource
from rlhfkit.stage import StageContext
from rlhfkit.tasks.arith_eval import RerankConfig, best_of_n_samples, rerank_picks, rerank_prompts, rerank_scores

SIDES = ("weak", "strong")
RERANKERS = ("rm", "prm", "orm")  # the reward side's models that rerank, those present
POLICY_ONLY = ("majority", "single", "oracle_best_of_n")  # best-of-n figures no reward model reads


@dataclass(frozen=True)
class GridSide:
    """One strength of the grid: a finished run's SFT policy and reward models."""

    run: ConfigPath = ""
    """a finished run directory of the embedded task; ``stage:`` paths of ``rl`` and ``reward`` resolve in it"""
    reward: ConfigPath = "stage:reward"
    """its reward stage's output: ``rm`` (the curves' proxy, and a reranker), ``prm`` and ``orm`` (rerankers)"""
    rl: PPOConfig = field(default_factory=PPOConfig)
    """the PPO settings of a curve whose policy is this side's (``rl.policy`` is the policy, its SFT model by default);
    the grid sets the reward model (the curve's reward side's ``rm``) and starts the critic from the policy"""
    bf16: bool = False
    """sample this policy's best-of-n responses under bf16 autocast (``SamplingConfig.bf16``)"""


@dataclass(frozen=True)
class StrengthConfig:
    """The strength grid (``configs/strength_grid.yaml``): two finished runs' policies × reward models."""

    weak: GridSide = field(default_factory=GridSide)
    """the weaker run (the quickstart's model pretrained from scratch)"""
    strong: GridSide = field(default_factory=GridSide)
    """the stronger run (the SmolLM2 transfer run)"""
    rerank: RerankConfig = field(default_factory=RerankConfig)
    """best-of-n sampling (n, n_prompts, temperature, max_new_tokens, seed; ``policy`` and ``bf16`` are the sides');
    ``data``: held-out prompts with the task ``meta``, whose ``stage:`` paths name the weak run's outputs"""
    curves: tuple[str, ...] = ("weak/weak", "strong/strong", "weak/strong")
    """the cells, ``policy side/reward side``, that get a short PPO run for the gold-vs-proxy curve"""
    eval_batch_size: int = 32
    """texts per reward-model forward pass when reranking"""

    def __post_init__(self):
        for cell in self.curves:
            parts = cell.split("/")
            if len(parts) != 2 or any(p not in SIDES for p in parts):
                raise ValueError(f"curves: {cell!r} is not policy/reward with each of {', '.join(SIDES)}")
        if len(set(self.curves)) != len(self.curves):
            raise ValueError(f"curves: {list(self.curves)} repeats a cell")


def cell_name(policy: str, reward: str) -> str:
    """A cell's row name in the metrics and the report: ``policy weak, RM strong``."""
    return f"policy {policy}, RM {reward}"


def run(cfg: StrengthConfig, ctx: StageContext) -> dict:
    acc = ctx.accelerator
    # --- inputs, every one checked before a model is loaded
    side_ctx = {s: _side_context(cfg, s, ctx) for s in SIDES}
    policies = {s: side_ctx[s].model(getattr(cfg, s).rl.policy, f"{s}.rl.policy") for s in SIDES}
    rerankers = {s: _rerankers(cfg, s, side_ctx[s]) for s in SIDES}
    records = rerank_prompts(cfg.rerank, side_ctx["weak"])
    _check_held_out(side_ctx, [r.prompt for r in records])
    for cell in cfg.curves:
        p, r = cell.split("/")
        rl = getattr(cfg, p).rl
        if rl.reward_source is not RewardSource.model or rl.seeds:
            raise ConfigError(f"{ctx.name}.{p}.rl: a curve is one PPO run against a reward model: reward_source must "
                              f"be model and seeds empty (got {rl.reward_source.value}, {list(rl.seeds)})")
        if "rm" not in rerankers[r]:
            raise ConfigError(f"{ctx.name}.curves: {cell} needs {r}'s BT reward model (rm); its reward directory "
                              f"has only {', '.join(rerankers[r])}")

    # --- best-of-n: each policy samples once, each reward side scores both policies' samples
    samples = {p: best_of_n_samples(dataclasses.replace(cfg.rerank, bf16=getattr(cfg, p).bf16), policies[p], records,
                                    acc.device) for p in SIDES}
    scores: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in SIDES:
        models = {k: load_reward_model(v, acc.device, cfg.eval_batch_size) for k, v in rerankers[r].items()}
        for p in SIDES:
            scores[p, r] = rerank_scores(models, samples[p])
        del models
    grid: dict = {}
    for p in SIDES:
        # one pass of the judge over the policy's samples, every reward side's scores picked from at once
        result, rows = rerank_picks(records, samples[p], {f"{r}/{m}": v for r in SIDES for m, v in scores[p, r].items()},
                                    cfg.rerank.n)
        for r in SIDES:
            grid[cell_name(p, r)] = {**{m: result[f"{r}/{m}"]["accuracy"] for m in scores[p, r]},
                                     **{m: result[m]["accuracy"] for m in POLICY_ONLY}}
        if acc.is_main_process:  # each sample's correctness and every model's score of it, prompt by prompt
            n = cfg.rerank.n
            atomic_write_jsonl(ctx.stage_dir / f"best_of_n_{p}.jsonl", [
                {**row, "responses": [s.text for s in samples[p][i * n:(i + 1) * n]],
                 "scores": {r: {m: v[i * n:(i + 1) * n] for m, v in scores[p, r].items()} for r in SIDES}}
                for i, row in enumerate(rows)])
    grid["n"], grid["n_prompts"] = cfg.rerank.n, len(records)

    # --- curves: a short PPO run per chosen cell, in its own directory of this stage
    curves, runs = {}, []
    for cell in cfg.curves:
        p, r = cell.split("/")
        name = f"ppo_{p}_{r}"
        rl = dataclasses.replace(getattr(cfg, p).rl, reward_models=(str(rerankers[r]["rm"]),), critic_init=str(policies[p]))
        sub = dataclasses.replace(side_ctx[p], stage_dir=ctx.stage_dir / name, name=name, log=None)
        if acc.is_main_process:
            sub.stage_dir.mkdir(parents=True, exist_ok=True)
            save_config(rl, sub.stage_dir / "config.yaml")  # what this run was, its reward model and critic included
        acc.wait_for_everyone()
        acc.print(f"[rlhfkit] {ctx.name}: PPO of the {p} policy against the {r} reward model ({name})")
        metrics = ppo.run(rl, sub)
        if acc.is_main_process:
            atomic_write_json(sub.stage_dir / "metrics.json", metrics)
        acc.wait_for_everyone()
        curves[cell_name(p, r)] = curve_figures(read_jsonl_plain(sub.stage_dir / "log.jsonl"))
        runs.append(name)
    return {"strength_grid": grid, "strength_curves": curves, "runs": runs,
            "summary_sections": ["strength_grid", "strength_curves"]}


def curve_figures(rows: list[dict]) -> dict:
    """Where gold peaks on a PPO log's gold-vs-proxy curve (``report_plots.overoptimization_points``: KL order),
    and its first and last rollouts: KL (nats), gold score and proxy reward at each."""
    pts = overoptimization_points(rows)
    if not pts:
        return {}
    logged = [r for r in rows if "gold_score" in r and "kl" in r]  # the rollouts, in step order
    first, last, peak = logged[0], logged[-1], gold_peak(pts)
    return {"rollouts": len(pts),
            "kl_at_gold_peak": peak[0] ** 2, "gold_at_peak": peak[1], "proxy_at_peak": peak[2],
            "first_kl": first["kl"], "first_gold": first["gold_score"], "first_proxy": first["reward"],
            "last_kl": last["kl"], "last_gold": last["gold_score"], "last_proxy": last["reward"]}


def _side_context(cfg: StrengthConfig, side: str, ctx: StageContext) -> StageContext:
    """The context whose ``stage:`` paths name the side's run (its ``out``)."""
    value = getattr(cfg, side).run
    if not value:
        raise ConfigError(f"{ctx.name}.{side}.run: empty; name a finished run directory")
    path = ctx.resolve(value, key=f"{side}.run")
    if not path.is_dir():
        raise ConfigError(f"{ctx.name}.{side}.run: {path} is not a directory")
    return dataclasses.replace(ctx, out=path)


def _rerankers(cfg: StrengthConfig, side: str, sctx: StageContext) -> dict[str, Path]:
    """The side's reward models present (``rm``, ``prm``, ``orm``), by name."""
    reward = sctx.resolve(getattr(cfg, side).reward, key=f"{side}.reward")
    found = {k: reward / k for k in RERANKERS if (reward / k).is_dir()}
    if not found:
        raise ConfigError(f"{sctx.name}.{side}.reward: {reward} holds none of {', '.join(RERANKERS)}")
    return found


def _check_held_out(side_ctx: dict, prompts: list[str]) -> None:
    """Both runs must have held the reranked prompts out: a prompt the other run trained on would favour it."""
    for s, sctx in side_ctx.items():
        for path in (Path(sctx.out) / "data" / f for f in ("sft.jsonl", "prompts.jsonl")):
            if not path.exists():
                continue
            seen = {r.record.get("prompt") for r in iter_records(path)}
            if inside := [p for p in prompts if p in seen]:
                raise ConfigError(f"{path}: {len(inside)} of the reranked prompts are in {s}'s training data "
                                  f"(first: {json.dumps(inside[0])[:80]}); rerank on prompts both runs held out")
