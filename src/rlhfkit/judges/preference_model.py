"""A pairwise preference model: reads the prompt and BOTH responses and outputs P(a ≻ b) directly.

A Bradley-Terry reward model scores each response alone, so its preference σ(r(a) − r(b)) is
transitive by construction: it cannot represent a ≻ b ≻ c ≻ a. The pairwise model sees the two
responses together, f(a, b) = σ(head(backbone(prompt, "A:", a, "B:", b))), and can.

A single forward f(a, b) has a position bias (it need not equal 1 − f(b, a)). We symmetrize by
averaging both orders (as the DNO paper's preference model and PairRM do):

    P(a ≻ b) = ½ (f(a, b) + 1 − f(b, a))

Computed for the pair in a canonical order (by string) and returned as p or 1 − p, so
P(a ≻ b) + P(b ≻ a) = 1 holds exactly in floating point, and P(a ≻ a) = ½.

Training (``train_comparison_model``) is on comparisons {prompt, chosen, rejected}, each shown
in both orders (target 1 for f(chosen, rejected), 0 for f(rejected, chosen)), binary
cross-entropy. The same function trains the Bradley-Terry reward model on the same data, backbone
and budget (``kind="bt"``), so the two preference functions differ only in what they can express.

On disk: the scalar-model directory of ``rlhfkit.models.reward`` plus ``preference_model.json``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from rlhfkit.training import TrainConfig

MARKER = "preference_model.json"


def pair_text_ids(tokenizer, prompt: str, a: str, b: str, max_len: int) -> list[int]:
    """prompt (project rendering) + "Response A:\\n" a "\\nResponse B:\\n" b + EOS, cut from the left."""
    from rlhfkit.data.collate import encode_prompt

    body = tokenizer(f"Response A:\n{a}\nResponse B:\n{b}", add_special_tokens=False)["input_ids"]
    ids = encode_prompt(tokenizer, prompt) + body + [tokenizer.eos_token_id]
    return ids[-max_len:]


class PairwisePreferenceModel:
    """A trained pairwise preference model; implements PreferenceFunction."""

    name = "preference-model"

    def __init__(self, net, tokenizer, device=None, batch_size: int = 32):
        self.net, self.tokenizer = net, tokenizer
        self.device = device or next(net.parameters()).device
        self.batch_size = batch_size

    def logits(self, items: Sequence[tuple[str, str, str]], grad: bool = False) -> torch.Tensor:
        """f's logit for each (prompt, a, b) in the given order, (N,)."""
        from rlhfkit.models.reward import collate

        out = []
        ctx = torch.enable_grad() if grad else torch.no_grad()
        with ctx:
            for s in range(0, len(items), self.batch_size):
                seqs = [pair_text_ids(self.tokenizer, p, a, b, self.net.info.max_len) for p, a, b in items[s:s + self.batch_size]]
                batch = collate(seqs, None, self.tokenizer.pad_token_id)
                out.append(self.net(**{k: v.to(self.device) for k, v in batch.items()}))
        return torch.cat(out) if out else torch.zeros(0)

    def prob(self, items: Sequence[tuple[str, str, str]]) -> list[float]:
        self.net.eval()
        canon = [(p, a, b) if a <= b else (p, b, a) for p, a, b in items]
        both = [(p, x, y) for p, x, y in canon] + [(p, y, x) for p, x, y in canon]
        f = torch.sigmoid(self.logits(both).double()).tolist()
        n = len(items)
        out = []
        for i, (_, a, b) in enumerate(items):
            if a == b:
                out.append(0.5)
                continue
            p_canon = 0.5 * (f[i] + 1.0 - f[n + i])
            out.append(p_canon if a <= b else 1.0 - p_canon)
        return out


def load_preference_model(path: str | Path, device=None, batch_size: int = 32) -> PairwisePreferenceModel:
    from rlhfkit.models.reward_files import load_reward_model

    path = Path(path)
    if not (path / MARKER).exists():
        raise FileNotFoundError(f"{path}: not a pairwise preference model directory (no {MARKER})")
    rm = load_reward_model(path, device=device, batch_size=batch_size)
    return PairwisePreferenceModel(rm.net, rm.tokenizer, rm.device, batch_size)


def load_bt_preference(path: str | Path, device=None):
    """σ(r(a) − r(b)) of a saved Bradley-Terry reward model (``rlhfkit.judges.reward_model``)."""
    from rlhfkit.judges.reward_model import RewardModelPreference

    return RewardModelPreference(path, device=device)


# ---------------------------------------------------------------- training

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


def train_comparison_model(kind: str, backbone: str | Path, pairs: Sequence, cfg: ComparisonModelConfig,
                           out_dir: Path, accelerator, log) -> dict:
    """Train ``kind`` = "pm" (pairwise) or "bt" (Bradley-Terry reward) on pairs with .prompt/.chosen/.rejected."""
    from tqdm.auto import tqdm

    from rlhfkit.io import atomic_write_json
    from rlhfkit.losses import bradley_terry_loss
    from rlhfkit.models.reward import collate, encode
    from rlhfkit.models.reward_files import build_scalar_model, save_scalar_model
    from rlhfkit.nonfinite import NonFiniteGuard
    from rlhfkit.training import Collective, global_batches, make_optimizer_and_scheduler, shard

    if kind not in ("pm", "bt"):
        raise ValueError(f"kind must be 'pm' or 'bt', got {kind!r}")
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size % world:
        raise ValueError(f"comparison_model.batch_size={cfg.batch_size} must be a multiple of the {world} processes")
    net, tok = build_scalar_model(backbone, kind="reward", max_len=cfg.max_len, seed=cfg.seed)
    max_len = net.info.max_len
    if kind == "pm":
        # Each comparison in both orders: (chosen, rejected) → 1, (rejected, chosen) → 0.
        fwd = [pair_text_ids(tok, p.prompt, p.chosen, p.rejected, max_len) for p in pairs]
        rev = [pair_text_ids(tok, p.prompt, p.rejected, p.chosen, max_len) for p in pairs]
    else:
        fwd = [encode(tok, net.info, p.prompt, p.chosen)[0] for p in pairs]
        rev = [encode(tok, net.info, p.prompt, p.rejected)[0] for p in pairs]
        # The head's bias cancels in r(chosen) − r(rejected): its gradient is rounding noise, which Adam's
        # normalisation turns into lr-sized steps that differ with the process count. Frozen at 0, the
        # model's preferences σ(r_c − r_r) are unchanged and 2 processes give 1 process's weights.
        net.head.bias.requires_grad_(False)
    total = cfg.total_steps(len(pairs))
    opt, sched = make_optimizer_and_scheduler(net, cfg, total)
    # The scheduler stays out of prepare(): accelerate would step it once per process (see training.py).
    net, opt = accelerator.prepare(net, opt)
    net.eval()  # dropout off
    t0, acc_sum, n_seen, coll = time.time(), 0.0, 0, Collective(accelerator)
    guard = NonFiniteGuard(f"{kind} model", cfg.max_nonfinite_steps, accelerator)
    bar = tqdm(global_batches(len(pairs), cfg.batch_size, total, cfg.seed), total=total,
               desc=f"train {kind}", disable=not accelerator.is_main_process)
    for step, batch_idx in enumerate(bar):
        # Each process scores an equal share; the loss is a mean over it, so DDP's mean of the
        # processes' gradients is the one-process gradient of the whole batch.
        idx = shard(batch_idx, 1, rank, world)[0]
        batch = collate([fwd[i] for i in idx] + [rev[i] for i in idx], None, tok.pad_token_id)
        out = net(**{k: v.to(accelerator.device) for k, v in batch.items()})  # (2B,)
        k = len(idx)
        if kind == "pm":
            target = torch.cat([torch.ones(k), torch.zeros(k)]).to(out.device)
            loss = F.binary_cross_entropy_with_logits(out, target)
            accuracy = ((out[:k] > 0).float().mean() + (out[k:] < 0).float().mean()) / 2
        else:
            loss, _ = bradley_terry_loss(out[:k], out[k:])
            accuracy = (out[:k] > out[k:]).float().mean()
        accelerator.backward(loss)
        grad_norm = guard.grad_norm(net, cfg.grad_clip)
        logged = step % cfg.log_every == 0 or step == total - 1  # the same steps on every process: collectives
        # the whole batch's loss, the mean over processes of equal shares: every step when the guard decides on it
        loss_all = coll.mean(loss.detach()).item() if guard.enabled or logged else None
        guard.step(step + 1, loss_all, [grad_norm], [(opt, sched)])
        acc_sum += accuracy.item() * k
        n_seen += k
        if logged:
            log.write({"step": step + 1, "loss": loss_all, "accuracy": coll.mean(accuracy).item(),
                       "lr": sched.get_last_lr()[0], "elapsed_s": time.time() - t0})
            bar.set_postfix(loss=f"{loss_all:.3f}")
    net = accelerator.unwrap_model(net)
    if accelerator.is_main_process:
        save_scalar_model(net, tok, out_dir)
        if kind == "pm":
            atomic_write_json(out_dir / MARKER, {"kind": "pairwise", "symmetrized": True})
    train_accuracy = coll.mean(torch.tensor(acc_sum / max(n_seen, 1), device=accelerator.device)).item()
    return {"final_loss": loss_all, "train_accuracy": train_accuracy, "train_steps": total,
            "train_runtime_s": time.time() - t0, **guard.metrics()}
