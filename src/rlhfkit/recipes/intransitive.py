"""The intransitive experiment: DNO with a Bradley-Terry preference function against a pairwise one.

Read top to bottom, from the pretrained model, on the same data and budget for both arms:

1. SFT on the task's demonstrations with each answer line rewritten in one of three styles,
   drawn with ``style_weights`` (spaced, tight, wide), so the SFT policy samples all three;
2. label comparisons like annotators would: for each labeling prompt, two samples of the SFT
   policy, the intransitive judge's choice drawn from its P(a ≻ b)
   (``rlhfkit.tasks.intransitive_judge``: spaced ≻ tight ≻ wide ≻ spaced among equally good answers),
   as sampled or in the factorial design of ``label_styles: contrast`` (content and style compared
   apart, each edge of the cycle labelled equally often);
3. train, on those comparisons, a Bradley-Terry reward model (``bt``) and a pairwise preference
   model (``pm``) with the same backbone (the SFT model), steps and learning rate;
4. run DNO (``rlhfkit.recipes.dno``) from the SFT policy twice, with P = σ(r(a) − r(b)) and with
   the pairwise P, same iterations, prompts and samples; each arm keeps the iterate its own
   preference function rates best on validation prompts.

Why BT should lose: σ(r(a) − r(b)) is transitive. Fitted on a balanced cycle (``contrast``), the
best scalar gives the three styles the same reward, so the BT arm has no reason to change the
policy's style; the pairwise model learns each edge, so DNO's ranking against the current iterate
follows the cycle towards the style that beats the policy's, and its validation selection sees
which iterate beats the SFT policy. (On labels as sampled, BT fits the two frequent edges and
violates the rare one, which never involves the SFT policy's own greedy style, so there it finds
the style that beats SFT as well as the pairwise model does.) The eval stage then measures
``win_rate_vs_sft`` with the intransitive judge itself (``eval.judge: intransitive``).
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from rlhfkit.config import coerce_enums
from rlhfkit.data.loading import load_demonstrations, load_prompts
from rlhfkit.distributed import Collective, make_accelerator, refuse_sharded
from rlhfkit.generation import SamplingConfig, sample
from rlhfkit.io import JsonlLog, atomic_write_json, atomic_write_jsonl
from rlhfkit.judges.preference_model import MARKER, pair_text_ids
from rlhfkit.judges.spec import from_spec
from rlhfkit.losses import bradley_terry_loss
from rlhfkit.models.loading import load_causal_lm, load_tokenizer
from rlhfkit.models.reward import collate, encode
from rlhfkit.models.reward_files import build_scalar_model, save_scalar_model
from rlhfkit.paths import ModelRef
from rlhfkit.recipes import dno, sft
from rlhfkit.recipes.dno import DNOConfig
from rlhfkit.recipes.sft import SFTConfig
from rlhfkit.stage import StageContext
from rlhfkit.tasks import JUDGES as TASK_JUDGES
from rlhfkit.tasks.arith import gold_response
from rlhfkit.tasks.intransitive_judge import BEATS, STYLES, answer_style, restyle
from rlhfkit.training import TrainConfig, fit


@dataclass(frozen=True)
class ComparisonModelConfig(TrainConfig):
    """Training of a comparison model (pairwise preference model or Bradley-Terry reward model)."""

    max_len: int = 256
    """longest input in tokens (a pairwise input holds both responses)"""
    epochs: float = 2.0
    """passes over the comparisons"""
    lr: float = 3e-4
    """peak learning rate"""
    batch_size: int = 32
    """comparisons per optimizer step"""
    warmup_steps: int = 5
    """linear warm-up steps"""


def _dno() -> DNOConfig:
    return DNOConfig(iterations=2, prompts_per_iteration=192, samples_per_prompt=4, eta=0.5, epochs=2.0,
                     lr=2e-4, batch_size=16, n_validation=48, mix_fractions=(0.5,))


class LabelStyles(StrEnum):
    """Which answer-line styles the labelled comparisons show (see ``IntransitiveConfig.label_styles``)."""

    sft = "sft"
    """the samples as written"""
    uniform = "uniform"
    """each compared answer line rewritten in a style drawn uniformly"""
    contrast = "contrast"
    """a factorial design: a comparison of content in one common style, plus one of style alone"""


@dataclass(frozen=True)
class IntransitiveConfig:
    """The intransitive experiment (one stage; see the module docstring)."""

    model: ModelRef = "stage:pretrain/model"
    """pretrained model to fine-tune"""
    sft_model: ModelRef = ""
    """an SFT policy already trained on styled demonstrations (e.g. an earlier run's ``intransitive/sft/model``)
    to start from instead of step 1; empty trains one"""
    style_weights: tuple[float, float, float] = (0.5, 0.3, 0.2)
    """share of SFT demonstrations whose answer line is spaced, tight, wide"""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """supervised fine-tuning on the styled demonstrations"""
    n_label_prompts: int = 512
    """prompts (from prompts.jsonl, after DNO's) labelled with one comparison each"""
    label_temperature: float = 1.0
    """sampling temperature of the two responses compared per labeling prompt"""
    label_styles: LabelStyles = LabelStyles.sft
    """``sft``: compare the samples as written; ``uniform``: rewrite each compared answer line in a style drawn
    uniformly first, so every pair of styles is labelled about equally often (the SFT mix leaves rare pairs unseen);
    ``contrast``: a factorial design: the two samples compared in one common style drawn uniformly (a comparison
    of content only), plus a comparison of style only: the first sample written in two styles, the pair of styles
    drawn uniformly from the cycle's three, so each edge of the cycle is labelled equally often"""
    judge_beta: float = 10.0
    """the intransitive judge's weight on gold-score differences"""
    judge_gamma: float = 3.0
    """the intransitive judge's weight on the style cycle (σ(3) ≈ 0.95)"""
    comparison_model: ComparisonModelConfig = field(default_factory=ComparisonModelConfig)
    """training of both the BT reward model and the pairwise preference model"""
    dno: DNOConfig = field(default_factory=_dno)
    """DNO settings shared by both arms (its ``judge``, ``model`` and ``prompts`` are set here)"""
    seed: int = 0
    """style assignment and label-draw seed"""

    def __post_init__(self):
        coerce_enums(self)
        if self.dno.seeds:  # both arms run inside this one stage; rlhfkit.seeds repeats whole stages
            raise ValueError("dno.seeds: the intransitive experiment runs DNO once per arm; set its seed instead")


def run(cfg: IntransitiveConfig, ctx: StageContext) -> dict:
    refuse_sharded(ctx.accelerator, "intransitive")  # its DNO arms sample from and copy the policy
    stage_dir = ctx.stage_dir
    data = ctx.resolve("stage:data")
    # 1. styled demonstrations → SFT
    if cfg.sft_model:
        sft_dir = ctx.model(cfg.sft_model, "sft_model")
        sft_metrics = {"reused": str(sft_dir)}
    else:
        rng = random.Random(cfg.seed)
        demos = load_demonstrations(data / "sft.jsonl")
        styled = [{"prompt": d.prompt, "response": restyle(d.response, rng.choices(STYLES, cfg.style_weights)[0])}
                  for d in demos]
        atomic_write_jsonl(stage_dir / "sft_styled.jsonl", styled)
        acc = make_accelerator(cfg.sft)
        log = JsonlLog(stage_dir / "sft_log.jsonl", enabled=acc.is_main_process)
        sft_cfg = dataclasses.replace(cfg.sft, model=cfg.model, data=str(stage_dir / "sft_styled.jsonl"))
        sft_metrics = sft.run(sft_cfg, dataclasses.replace(ctx, stage_dir=stage_dir / "sft", accelerator=acc, log=log))
        log.close()
        sft_dir = stage_dir / "sft" / "model"

    # 2. comparisons by the intransitive judge on pairs of SFT samples (their own seeded draws, so a reused
    #    SFT policy gets the labels a fresh run would)
    rng = random.Random(cfg.seed + 1)
    records = load_prompts(data / "prompts.jsonl")
    raw = [{"prompt": r.prompt, "meta": r.meta} for r in records]
    judge = from_spec("intransitive", raw, beta=cfg.judge_beta, gamma=cfg.judge_gamma, task_judges=TASK_JUDGES)
    n_dno = cfg.dno.n_validation + cfg.dno.iterations * cfg.dno.prompts_per_iteration
    label_prompts = [r.prompt for r in records[n_dno:n_dno + cfg.n_label_prompts]]
    if len(label_prompts) < cfg.n_label_prompts:
        label_prompts = [r.prompt for r in records[-cfg.n_label_prompts:]]  # overlap with DNO's prompts: say so
        print(f"[rlhfkit] intransitive: prompts.jsonl too small for disjoint label prompts; labeling its last {len(label_prompts)}")
    device = make_accelerator().device
    policy, tok = load_causal_lm(sft_dir).to(device), load_tokenizer(sft_dir)
    sampling = SamplingConfig(max_new_tokens=cfg.dno.sampling.max_new_tokens, temperature=cfg.label_temperature, batch_size=64)
    samples = sample(policy, tok, label_prompts, sampling, seed=cfg.seed, num_return_sequences=2, device=device)
    del policy
    pairs, styles = label_pairs(judge, label_prompts, samples, cfg.label_styles, rng)
    if not pairs:
        raise RuntimeError(f"intransitive: none of the {len(label_prompts)} labeling prompts gave a comparison: every "
                           f"pair of samples was identical or unfinished (no EOS within "
                           f"{cfg.dno.sampling.max_new_tokens} tokens); raise dno.sampling.max_new_tokens or train SFT longer")
    atomic_write_jsonl(stage_dir / "comparisons.jsonl", pairs)
    style_share = {s: styles.count(s) / len(styles) for s in (*STYLES, None)}

    # 3. BT reward model and pairwise preference model: same data, backbone, budget
    Pair = dataclasses.make_dataclass("Pair", ["prompt", "chosen", "rejected"])
    objs = [Pair(p["prompt"], p["chosen"], p["rejected"]) for p in pairs]
    model_metrics = {}
    for kind in ("bt", "pm"):
        acc = make_accelerator(cfg.comparison_model)
        log = JsonlLog(stage_dir / f"{kind}_model_log.jsonl", enabled=acc.is_main_process)
        model_metrics[kind] = train_comparison_model(kind, sft_dir, objs, cfg.comparison_model, stage_dir / f"{kind}_model", acc, log)
        log.close()

    # 4. DNO from the SFT policy, both ways
    arms = {}
    for kind in ("bt", "pm"):
        pf = from_spec(f"{kind}:{stage_dir / f'{kind}_model'}")
        dcfg = dataclasses.replace(cfg.dno, judge=f"{kind}:{stage_dir.name}/{kind}_model", model=str(sft_dir),
                                   prompts=str(data / "prompts.jsonl"))
        acc = make_accelerator(dcfg)
        log = JsonlLog(stage_dir / f"dno_{kind}_log.jsonl", enabled=acc.is_main_process)
        arms[kind] = dno.run(dcfg, dataclasses.replace(ctx, stage_dir=stage_dir / kind, accelerator=acc, log=log), pf=pf)
        log.close()
        del pf
    # How each learned preference function reads the cycle, on one labeling prompt's answer line.
    probe = _cycle_probe(judge, label_prompts, {k: from_spec(f"{k}:{stage_dir / f'{k}_model'}") for k in ("bt", "pm")})
    return {"sft": sft_metrics, "label": {"n_pairs": len(pairs), "compared_style_share": style_share},
            "comparison_models": model_metrics, "dno": arms, "cycle_probe": probe,
            "summary_sections": ["intransitive"],
            "intransitive": {"cycle": "spaced ≻ tight ≻ wide ≻ spaced (answer-line styles), among equally good answers",
                             "compared_style_share": style_share, "cycle_probe": probe,
                             "selected": {k: v["selected"] for k, v in arms.items()}}}


def label_pairs(judge, prompts: list[str], samples, label_styles: str, rng: random.Random) -> tuple[list[dict], list]:
    """Comparisons of two samples per prompt (``samples[2i]``, ``samples[2i + 1]``, each with ``.text`` and
    ``.finished``), each decided by one draw from the judge's P(a ≻ b); see ``label_styles``.

    Returns the comparisons ``{prompt, chosen, rejected}`` and the answer style of every compared sample.
    A pair of identical or unfinished samples is not compared; a contrast pair needs only the first sample
    finished and with an answer line.
    """
    pairs, styles = [], []
    for i, prompt in enumerate(prompts):
        a, b = samples[2 * i].text, samples[2 * i + 1].text
        if label_styles == "uniform":
            a, b = restyle(a, rng.choice(STYLES)), restyle(b, rng.choice(STYLES))
        elif label_styles == "contrast":
            common = rng.choice(STYLES)  # the content comparison carries no style difference
            a, b = restyle(a, common), restyle(b, common)
        styles += [answer_style(a), answer_style(b)]
        if label_styles == "contrast" and samples[2 * i].finished and answer_style(a) is not None:
            x, y = rng.choice(list(BEATS.items()))  # one of the cycle's three style pairs, uniformly
            pairs.append(_labelled(judge, rng, prompt, restyle(a, x), restyle(a, y)))
        if a == b or not (samples[2 * i].finished and samples[2 * i + 1].finished):
            continue
        pairs.append(_labelled(judge, rng, prompt, a, b))
    return pairs, styles


def _labelled(judge, rng: random.Random, prompt: str, a: str, b: str) -> dict:
    """One annotator's comparison of ``a`` and ``b``: the winner drawn from the judge's P(a ≻ b)."""
    a_wins = rng.random() < judge.prob([(prompt, a, b)])[0]
    return {"prompt": prompt, "chosen": a if a_wins else b, "rejected": b if a_wins else a}


def train_comparison_model(kind: str, backbone: str | Path, pairs: Sequence, cfg: ComparisonModelConfig,
                           out_dir: Path, accelerator, log) -> dict:
    """Train ``kind`` = "pm" (pairwise, ``judges.preference_model``) or "bt" (Bradley-Terry reward) on pairs with
    .prompt/.chosen/.rejected by ``training.fit``, dropout off; saves ``out_dir``. The same data, backbone and
    budget for both, so the two preference functions differ only in what they can express.

    pm: each comparison in both orders, f(chosen, rejected) → 1 and f(rejected, chosen) → 0, binary
    cross-entropy over the 2B logits; bt: ``losses.bradley_terry_loss`` on r(chosen), r(rejected) (B,).
    """
    if kind not in ("pm", "bt"):
        raise ValueError(f"kind must be 'pm' or 'bt', got {kind!r}")
    world = accelerator.num_processes
    if cfg.batch_size % world:
        raise ValueError(f"comparison_model.batch_size={cfg.batch_size} must be a multiple of the {world} processes")
    net, tok = build_scalar_model(backbone, kind="reward", max_len=cfg.max_len, seed=cfg.seed)
    max_len = net.info.max_len
    if kind == "pm":
        fwd = [pair_text_ids(tok, p.prompt, p.chosen, p.rejected, max_len) for p in pairs]
        rev = [pair_text_ids(tok, p.prompt, p.rejected, p.chosen, max_len) for p in pairs]
    else:
        fwd = [encode(tok, net.info, p.prompt, p.chosen)[0] for p in pairs]
        rev = [encode(tok, net.info, p.prompt, p.rejected)[0] for p in pairs]
        # The head's bias cancels in r(chosen) − r(rejected): its gradient is rounding noise, which Adam's
        # normalisation turns into lr-sized steps that differ with the process count. Frozen at 0, the
        # model's preferences σ(r_c − r_r) are unchanged and 2 processes give 1 process's weights.
        net.head.bias.requires_grad_(False)
    accuracy_sum, n_seen = 0.0, 0

    def batch_loss(model, idx, global_idx):
        nonlocal accuracy_sum, n_seen
        batch = collate([fwd[i] for i in idx] + [rev[i] for i in idx], None, tok.pad_token_id)
        out = model(**{k: v.to(accelerator.device) for k, v in batch.items()})  # (2B,)
        k = len(idx)
        if kind == "pm":
            target = torch.cat([torch.ones(k), torch.zeros(k)]).to(out.device)
            loss = F.binary_cross_entropy_with_logits(out, target)
            accuracy = ((out[:k] > 0).float().mean() + (out[k:] < 0).float().mean()) / 2
        else:
            loss, _ = bradley_terry_loss(out[:k], out[k:])
            accuracy = (out[:k] > out[k:]).float().mean()
        accuracy_sum += accuracy.item() * k
        n_seen += k
        # Equal micro-batches: each one's mean × its share of the batch × processes (exactly 1 without accumulation).
        share = loss * (k * world / len(global_idx))
        return share, share.detach(), {"accuracy": accuracy.item()}

    done = fit(net, len(pairs), batch_loss, cfg, accelerator, log, name=f"{kind} model", train_mode=False, unit="pairs")
    if accelerator.is_main_process:
        save_scalar_model(net, tok, out_dir)
        if kind == "pm":
            atomic_write_json(out_dir / MARKER, {"kind": "pairwise", "symmetrized": True})
    train_accuracy = Collective(accelerator).mean(torch.tensor(accuracy_sum / max(n_seen, 1),
                                                               device=accelerator.device)).item()
    return {"final_loss": done["final_loss"], "train_accuracy": train_accuracy, "train_steps": done["train_steps"],
            "train_runtime_s": done["train_runtime_s"], **{k: v for k, v in done.items() if k.startswith("skipped_nonfinite")}}


def _cycle_probe(judge, prompts, pfs) -> dict:
    """Mean P(style x ≻ style y) of each preference function on gold responses restyled, over 32 prompts."""
    out = {}
    probs = [judge.problem(p) for p in prompts[:32]]
    for name, pf in {"judge": judge, **pfs}.items():
        row = {}
        for a, b in BEATS.items():
            items = [(p, restyle(gold_response(q), a), restyle(gold_response(q), b)) for p, q in zip(prompts[:32], probs)]
            row[f"P({a} > {b})"] = sum(pf.prob(items)) / len(items)
        out[name] = row
    return out
