"""Evaluation recipe: sample each policy on held-out prompts and judge the responses.

Two paths, chosen by ``eval.judge``:

- the embedded task (``oracle`` or ``intransitive``; every prompt carries ``meta``): every figure
  comes with a 95% confidence interval over prompts. ``win_rate_vs_sft`` is the judge's pairwise
  preference of a policy's response over the SFT policy's response to the same prompt, the judge
  built by ``judges.spec.from_spec`` and read noiselessly (``TaskOracle.verdict``: the oracle's is 1
  if its gold score is higher, 0.5 on a tie, 0 otherwise). A response that never reached
  EOS is penalised (scored ``unfinished_score``, never counted correct) instead of being judged as
  if complete.
- any other judge (``judges.spec.from_spec``: a reward-model directory, a judge YAML for a local
  LLM or an HTTP endpoint) on any prompts (``{"prompt": ...}`` or ``{"messages": [...]}``, no
  ``meta`` needed): ``win_rate`` = mean over prompts of the judge's P(policy's response ≻
  ``reference``'s response), ``judge_score`` (a reward model's mean score), ``response_length``
  and ``hit_token_limit_rate`` (responses cut at ``sampling.max_new_tokens`` without EOS; the
  judge sees them as they are, so read the win rate beside this rate).

Beside each raw win rate against the reference (``win_rate_vs_sft``, ``win_rate``), its length-controlled
one (``lc_win_rate_vs_sft``, ``lc_win_rate``: AlpacaEval 2's, ``bias.length_controlled_win_rate``, from
the same per-prompt verdicts and the responses' lengths in tokens; with ``length_coef``, the judge's
logit per standard deviation of length difference, inside it) and ``reference_length``, the mean
length of the reference's responses to the same prompts (``response_length`` is the policy's).

Beside the greedy figures, sampled ones (``sampled``, :class:`SampledEvalConfig`, on both paths): each policy
samples ``samples_per_prompt`` responses per prompt at ``temperature``, and every figure above is computed on
them under ``policies.NAME.sampled``. A prompt's samples are correlated, so each figure is first averaged over
a prompt's samples and its CI is over prompts (``n`` counts prompts): :func:`per_prompt_means`. The sampled
win rate pairs sample j of the policy with sample j of the reference for the same prompt. The
length-controlled win rate is left out of the sampled figures (its regression is on one verdict per prompt).

A policy naming the output of a stage that ran with ``seeds`` is evaluated once per seed (``ppo@seed0``, ...);
``policies`` then holds its aggregate (each figure's mean over seeds with ``sd``, ``seeds`` and a t interval
over seeds, ``seeds.over_seeds``) and ``policies_per_seed`` each seed's figures.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rlhfkit.bias import length_controlled_win_rate
from rlhfkit.config import ConfigError, check_positive
from rlhfkit.data.chat import prompt_to_json
from rlhfkit.data.loading import DataError, load_prompts
from rlhfkit.engines import make_engine
from rlhfkit.generation import SamplingConfig, sample
from rlhfkit.io import atomic_write_jsonl
from rlhfkit.judges.reward_model import RewardModelPreference
from rlhfkit.judges.spec import from_spec
from rlhfkit.models.loading import load_causal_lm, load_tokenizer
from rlhfkit.paths import ConfigPath, JudgeSpec, ModelRef
from rlhfkit.seeds import aggregate_policies, expand_policies
from rlhfkit.stage import StageContext
from rlhfkit.stats import mean_ci
from rlhfkit.tasks import JUDGES as TASK_JUDGES
from rlhfkit.tasks.arith import Problem
from rlhfkit.tasks.arith_judge import judge as oracle_verdict
from rlhfkit.tasks.oracle import TaskOracle
from rlhfkit.tasks.win_sources import win_sources


def _greedy() -> SamplingConfig:
    return SamplingConfig(max_new_tokens=64, temperature=0.0, batch_size=100)


@dataclass(frozen=True)
class SampledEvalConfig:
    """Sampled evaluation beside the greedy one: several responses per prompt at a temperature."""

    enabled: bool = True
    """also sample each policy and report the figures on those samples (``policies.NAME.sampled``) beside
    the greedy ones; on the general path the judge sees ``samples_per_prompt`` times as many pairs"""
    temperature: float = 0.7
    """softmax temperature (> 0; top-p 1); the length limit is greedy's, ``sampling.max_new_tokens``"""
    samples_per_prompt: int = 4
    """responses per prompt; each figure is averaged over a prompt's responses, its 95% CI taken over prompts"""
    batch_size: int = 200
    """sequences per generate call (``batch_size // samples_per_prompt`` prompts, at least one)"""

    def __post_init__(self):
        check_positive(temperature=self.temperature, samples_per_prompt=self.samples_per_prompt,
                       batch_size=self.batch_size)

    def sampling(self, greedy: SamplingConfig) -> SamplingConfig:
        """The sampler's settings, with greedy's length limit (so both figures cut responses alike) and precision."""
        return SamplingConfig(max_new_tokens=greedy.max_new_tokens, temperature=self.temperature,
                              batch_size=max(1, self.batch_size // self.samples_per_prompt), bf16=greedy.bf16)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation stage."""

    policies: dict[str, ModelRef] = field(default_factory=lambda: {"base": "stage:pretrain/model", "sft": "stage:sft/model"})
    """policy name → model: a stage's output (``stage:sft/model``), a directory, a .gguf file, ``package:NAME``
    or a hub name (``models.local.resolve_in_run``)"""
    data: ConfigPath = "stage:data/heldout.jsonl"
    """prompts (``prompt`` or ``messages``; task ``meta`` for the oracle; default: the task's held-out prompts)"""
    reference: str = "sft"
    """the policy that win rates are measured against (one of ``policies``)"""
    sampling: SamplingConfig = field(default_factory=_greedy)
    """how responses are sampled for evaluation (greedy by default)"""
    sampled: SampledEvalConfig = field(default_factory=SampledEvalConfig)
    """the sampled figures beside ``sampling``'s (several responses per prompt at a temperature)"""
    unfinished_score: float = 0.0
    """task judges: gold score of a response that never emitted EOS"""
    seed: int = 0
    """sampling and bootstrap seed (``sampled``: every policy's sampler starts from it, common random numbers)"""
    judge: JudgeSpec = "oracle"
    """the embedded task's ``oracle`` (higher gold score wins) or ``intransitive`` (the oracle plus the
    answer-style cycle of ``rlhfkit.tasks.intransitive_judge``): judge of ``win_rate_vs_sft``, the other
    metrics always the oracle's; or any judge spec of ``judges.spec.from_spec`` (a reward-model
    directory such as ``stage:reward/rm``, a judge YAML file) for prompts without ``meta``:
    ``win_rate`` against ``reference`` and the general metrics"""
    judge_beta: float = 10.0
    """task judges: weight of the gold-score difference in the judge's logit (the verdict is the logit's sign)"""
    judge_gamma: float = 3.0
    """intransitive judge: weight of the style cycle"""

    def __post_init__(self):
        if not self.judge.strip():
            raise ValueError("judge must be oracle, intransitive, a reward-model directory or a judge YAML file")
        # beta <= 0 would silence or invert the gold score in every verdict
        check_positive(judge_beta=self.judge_beta)

    @property
    def task_judge(self) -> bool:
        """The embedded task's judges: the oracle's metrics on prompts with ``meta``."""
        return self.judge in TASK_JUDGES


def judge_samples(problems, samples, unfinished_score: float) -> list[dict]:
    """Oracle verdicts for samples aligned with problems, as plain records."""
    rows = []
    for prob, s in zip(problems, samples):
        v = oracle_verdict(prob, s.text)
        score = v.score if s.finished else unfinished_score
        rows.append({
            "prompt": prompt_to_json(s.prompt),
            "response": s.text,
            "finished": s.finished,
            "score": score,
            "correct": bool(v.correct and s.finished),
            "abstained": bool(v.abstained),
            "invented": len(v.invented_numbers) > 0,
            "unsafe": bool(v.unsafe),
            "answerable": prob.answerable,
            "length": len(s.response_ids),
        })
    return rows


def per_prompt_means(values, samples_per_prompt: int) -> list[float]:
    """Prompt-major values, ``samples_per_prompt`` per prompt (prompt i's at i·k … i·k + k − 1), as each
    prompt's mean: the unit a CI is taken over, since one prompt's samples are correlated. k = 1: the values."""
    values, k = [float(v) for v in values], samples_per_prompt
    if len(values) % k:
        raise ValueError(f"{len(values)} values are not {k} per prompt")
    return [sum(values[i:i + k]) / k for i in range(0, len(values), k)]


def policy_metrics(rows: list[dict], ref_rows: list[dict] | None, seed: int, judge: TaskOracle,
                   samples_per_prompt: int = 1) -> dict:
    """The report's metrics for one policy, each ``{"mean", "ci95", "n"}`` over prompts.

    With ``ref_rows`` (the reference policy's rows, prompt by prompt), ``win_rate_vs_sft``: the mean of
    ``judge``'s noiseless verdicts (:meth:`~rlhfkit.tasks.oracle.TaskOracle.verdict`: 1, ½ or 0) on this
    policy's response against the reference's, with each row's ``score`` as judged (an unfinished
    response at ``unfinished_score``).

    ``samples_per_prompt`` k > 1 (sampled figures; rows and ``ref_rows`` prompt-major, k per prompt): each
    figure averages a prompt's k rows first (a rate on a subset, such as accuracy on answerable prompts,
    within the prompts of that subset), then takes mean and CI over prompts; row j of a prompt is judged
    against the reference's row j. No length-controlled win rate then.
    """
    def over_prompts(values):
        return mean_ci(per_prompt_means(values, samples_per_prompt), seed)

    # answerable is the prompt's: these subsets keep each prompt's k rows together
    answerable = [r for r in rows if r["answerable"]]
    unanswerable = [r for r in rows if not r["answerable"]]
    m = {
        "gold_score": over_prompts([r["score"] for r in rows]),
        "accuracy": over_prompts([r["correct"] for r in answerable]),
        "abstain_rate": over_prompts([r["abstained"] for r in unanswerable]),
        "false_abstain_rate": over_prompts([r["abstained"] for r in answerable]),
        "invented_number_rate": over_prompts([r["invented"] for r in rows]),
        "unsafe_rate": over_prompts([r["unsafe"] for r in rows]),
        "finished_rate": over_prompts([r["finished"] for r in rows]),
        "response_length": over_prompts([r["length"] for r in rows]),
    }
    if ref_rows is not None:
        wins = [judge.verdict(a["prompt"], a["response"], b["response"], a["score"], b["score"])
                for a, b in zip(rows, ref_rows, strict=True)]
        m["win_rate_vs_sft"] = over_prompts(wins)
        if samples_per_prompt == 1:
            m.update(length_control(wins, rows, ref_rows, seed, "lc_win_rate_vs_sft"))
    return m


def length_control(wins: list[float], rows: list[dict], ref_rows: list[dict], seed: int, key: str) -> dict:
    """``{key: LC win rate {"mean", "ci95", "n", "length_coef", "length_sd"}, "reference_length": mean_ci}``
    of per-prompt verdicts ``wins`` (P(policy ≻ reference)) with each row's ``length`` in tokens."""
    lc = length_controlled_win_rate(wins, [r["length"] for r in rows], [b["length"] for b in ref_rows], seed=seed)
    return {key: {k: lc[k] for k in ("mean", "ci95", "n", "length_coef", "length_sd")},
            "reference_length": mean_ci([b["length"] for b in ref_rows], seed)}


def task_win_sources(problems, rows_by_policy: dict[str, list[dict]], reference: str, judge: TaskOracle) -> dict:
    """The eval's ``win_sources`` summary section: for each policy but the reference, each task property's
    share of its win rate above ½ (``tasks.win_sources``); empty without the reference among the policies."""
    ref = rows_by_policy.get(reference)
    if ref is None:
        return {}
    ref_verdicts = [oracle_verdict(p, r["response"]) for p, r in zip(problems, ref)]
    sources = {}
    for name, rows in rows_by_policy.items():
        if name == reference:
            continue
        wins = [judge.verdict(a["prompt"], a["response"], b["response"], a["score"], b["score"]) for a, b in zip(rows, ref)]
        verdicts = [oracle_verdict(p, r["response"]) for p, r in zip(problems, rows)]
        sources[name] = win_sources(problems, rows, ref, wins, verdicts, ref_verdicts)
    return {"win_sources": sources, "summary_sections": ["win_sources"]}


def sample_rows(prompts, samples) -> list[dict]:
    """Plain records of samples aligned with their prompts (the general path: no task verdicts)."""
    return [{"prompt": prompt_to_json(p), "response": s.text, "finished": s.finished, "length": len(s.response_ids)}
            for p, s in zip(prompts, samples)]


def judge_rows(judge, prompts, rows_by_policy: dict[str, list[dict]], reference: str) -> dict[str, list[dict]]:
    """The rows with the judge's verdicts added: ``win_prob`` = P(this response ≻ the reference
    policy's response to the same prompt) on every policy but the reference, and ``score`` when
    the judge also scores pointwise (a reward model: ``model.score(prompts, responses)``)."""
    ref = rows_by_policy[reference]
    out = {}
    for name, rows in rows_by_policy.items():
        rows = [dict(r) for r in rows]
        if name != reference:
            # (prompt, policy's, reference's): P(a ≻ b) is P(policy ≻ reference), never the reverse.
            probs = judge.prob([(p, r["response"], b["response"]) for p, r, b in zip(prompts, rows, ref)])
            for r, q in zip(rows, probs):
                r["win_prob"] = float(q)
        if isinstance(judge, RewardModelPreference):
            for r, v in zip(rows, judge.model.score(list(prompts), [r["response"] for r in rows])):
                r["score"] = float(v)
        out[name] = rows
    return out


def general_metrics(rows: list[dict], seed: int, ref_rows: list[dict] | None = None,
                    samples_per_prompt: int = 1) -> dict:
    """One policy's metrics on the general path, each ``{"mean", "ci95", "n"}`` over prompts; with the
    reference's ``ref_rows`` (prompt by prompt), the length-controlled win rate beside ``win_rate``.
    ``samples_per_prompt`` k > 1: prompt-major rows, each prompt's k averaged first, as in
    :func:`policy_metrics` (no length-controlled win rate then)."""
    def over_prompts(values):
        return mean_ci(per_prompt_means(values, samples_per_prompt), seed)

    m = {}
    if rows and all("win_prob" in r for r in rows):
        m["win_rate"] = over_prompts([r["win_prob"] for r in rows])
        if ref_rows is not None and samples_per_prompt == 1:
            m.update(length_control([r["win_prob"] for r in rows], rows, ref_rows, seed, "lc_win_rate"))
    if rows and all("score" in r for r in rows):
        m["judge_score"] = over_prompts([r["score"] for r in rows])
    m["response_length"] = over_prompts([r["length"] for r in rows])
    m["hit_token_limit_rate"] = over_prompts([not r["finished"] for r in rows])
    return m


def policy_paths(cfg: EvalConfig, ctx: StageContext) -> dict[str, Path]:
    """Each policy's model directory: a stage's output, a directory, .gguf, ``package:NAME`` or a hub name; a
    seeded stage's output once per seed, as ``name@seed<s>`` (``seeds.expand_policies``)."""
    refs = expand_policies(cfg.policies, ctx.out, cfg.reference)
    return {name: ctx.model(ref, f"policies.{name.split('@seed')[0]}") for name, ref in refs.items()}


def run(cfg: EvalConfig, ctx: StageContext) -> dict:
    out, stage_dir, accelerator = ctx.out, ctx.stage_dir, ctx.accelerator
    records = load_prompts(ctx.resolve(cfg.data, key="data"))
    prompts = [r.prompt for r in records]
    if cfg.task_judge:
        for r in records:
            if r.meta is None:
                raise DataError(f"{r.where}: evaluation with the task judge needs the field 'meta' "
                                f"(for your own prompts, set eval.judge to a reward-model directory or a judge YAML)")
    elif cfg.reference not in cfg.policies:
        raise ConfigError(f"eval.reference: {cfg.reference!r} is not one of eval.policies ({', '.join(cfg.policies)})")
    paths = policy_paths(cfg, ctx)
    # Built before any sampling: a judge that cannot be built fails in seconds, not after the policies ran.
    judge = from_spec(cfg.judge, [{"prompt": r.prompt, "meta": r.meta} for r in records], base_dir=out,
                      device=accelerator.device, beta=cfg.judge_beta, gamma=cfg.judge_gamma, task_judges=TASK_JUDGES)
    greedy, sampled, sc = {}, {}, cfg.sampled
    for name, p in paths.items():
        tok = load_tokenizer(p)
        engine = make_engine(cfg.sampling, load_causal_lm(p).to(accelerator.device), tok, accelerator.device)
        greedy[name] = sample(engine, tok, prompts, cfg.sampling, seed=cfg.seed, device=accelerator.device)
        if sc.enabled:
            # Every policy from the same seed: common random numbers, so the comparison's noise is the policies'.
            sampled[name] = sample(engine, tok, prompts, sc.sampling(cfg.sampling), seed=cfg.seed,
                                   num_return_sequences=sc.samples_per_prompt, device=accelerator.device)
        engine.close()  # the policy's model (and vllm's memory) goes before the next policy loads
        del engine
    rows_by_policy, results = measure(cfg, judge, records, greedy, 1)
    if sc.enabled:
        k = sc.samples_per_prompt
        sampled_rows, sampled_results = measure(cfg, judge, records, sampled, k)
        for name, m in sampled_results.items():
            results[name]["sampled"] = {"temperature": sc.temperature, "samples_per_prompt": k, **m}
    if cfg.judge == "oracle":  # greedy responses: where each policy's wins come from
        extra = task_win_sources([Problem.from_meta(r.meta) for r in records], rows_by_policy, cfg.reference, judge)
    else:
        extra = {} if cfg.task_judge else {"judge": getattr(judge, "name", cfg.judge), "reference": cfg.reference}
    if accelerator.is_main_process:
        atomic_write_jsonl(stage_dir / "samples.jsonl", [
            dict(policy=name, **row) for name, rows in rows_by_policy.items() for row in rows
        ])
        if sc.enabled:
            atomic_write_jsonl(stage_dir / "samples_sampled.jsonl", [
                dict(policy=name, sample=i % k, **row) for name, rows in sampled_rows.items() for i, row in enumerate(rows)
            ])
    seeded = seeded_results(results)
    sections = seeded.get("summary_sections", []) + extra.get("summary_sections", [])
    return {**seeded, "n_prompts": len(prompts), **extra, **({"summary_sections": sections} if sections else {})}


def measure(cfg: EvalConfig, judge, records, samples_by_policy: dict[str, list], samples_per_prompt: int):
    """Judge each policy's samples (prompt-major, ``samples_per_prompt`` per prompt of ``records``) and
    compute its figures: (rows by policy, metrics by policy), by the task's oracle or the general judge."""
    k = samples_per_prompt
    if cfg.task_judge:
        problems = [Problem.from_meta(r.meta) for r in records for _ in range(k)]
        rows_by_policy = {name: judge_samples(problems, samples, cfg.unfinished_score)
                          for name, samples in samples_by_policy.items()}
        ref = rows_by_policy.get(cfg.reference)
        return rows_by_policy, {name: policy_metrics(rows, ref, cfg.seed, judge, k)
                                for name, rows in rows_by_policy.items()}
    prompts = [r.prompt for r in records for _ in range(k)]
    rows_by_policy = judge_rows(judge, prompts, {name: sample_rows(prompts, samples)
                                                 for name, samples in samples_by_policy.items()}, cfg.reference)
    return rows_by_policy, {name: general_metrics(rows, cfg.seed, rows_by_policy[cfg.reference], k)
                            for name, rows in rows_by_policy.items()}


def seeded_results(results: dict[str, dict]) -> dict:
    """``{"policies": results}``; a seeded policy's seeds (``name@seed<s>``) replaced there by their aggregate,
    mean ± sd over seeds (``seeds.aggregate_policies``), and kept under ``policies_per_seed``, a report section."""
    policies, per_seed = aggregate_policies(results)
    if not per_seed:
        return {"policies": policies}
    return {"policies": policies, "policies_per_seed": per_seed, "summary_sections": ["policies_per_seed"]}
