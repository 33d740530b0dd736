"""Mixed precision (``models.precision``): heads and log-softmax in fp32 under bf16 autocast, and bf16 losses
that agree with fp32 ones on a tiny model. Autocast is entered directly (``torch.autocast``, what accelerate's
prepared forward does under ``mixed_precision: bf16``), since the process-wide AcceleratorState cannot
switch precision between tests; ``test_bf16_stage_follows_fp32`` runs the real path in a subprocess."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

from rlhfkit.losses import bradley_terry_loss
from rlhfkit.models.critic import Critic
from rlhfkit.models.precision import fp32_head, frozen_dtype, resolve_mixed_precision
from rlhfkit.models.reward import HeadInfo, ScalarModel
from rlhfkit.models.token_logps import per_row, scored_logprobs
from rlhfkit.policy_losses import ppo_policy_loss
from rlhfkit.preference_losses import dpo_loss, sft_nll

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def _config(**kw) -> LlamaConfig:
    return LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, **kw)


def test_mixed_precision_resolution_and_frozen_dtype():
    assert resolve_mixed_precision("no") == "no" and resolve_mixed_precision("bf16") == "bf16"
    expect = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    assert resolve_mixed_precision("auto") == expect
    assert frozen_dtype("bf16") is torch.bfloat16 and frozen_dtype("fp16") is torch.float16
    assert frozen_dtype("no") is None


def test_fp32_head_ignores_autocast():
    """Under bf16 autocast a Linear runs in bf16; fp32_head runs it in fp32: equal to the plain fp32 head,
    while autocast's own result differs (so the check can fail)."""
    torch.manual_seed(0)
    head, hidden = torch.nn.Linear(64, 2), torch.randn(3, 5, 64)
    exact = head(hidden)
    with torch.autocast(**BF16):
        ours, theirs = fp32_head(head, hidden.bfloat16()), head(hidden)
    assert ours.dtype is torch.float32 and theirs.dtype is torch.bfloat16
    assert torch.equal(ours, head(hidden.bfloat16().float()))
    assert (theirs.float() - exact).abs().max() > 1e-3  # what a bf16 head would have given


@pytest.mark.parametrize("which", ["critic", "reward"])
def test_value_and_reward_heads_are_fp32_under_autocast(which):
    """The critic's value head and a reward model's head run in fp32 on the hidden state the backbone gave
    under autocast (transformers' final norm returns it in fp32; autocast would still run the head in bf16)."""
    torch.manual_seed(0)
    backbone = LlamaModel(_config()).eval()
    ids, mask = torch.randint(0, 300, (2, 12)), torch.ones(2, 12, dtype=torch.long)
    if which == "critic":
        net = Critic(backbone, 2)
        torch.nn.init.normal_(net.head.weight)
    else:
        net = ScalarModel(backbone, HeadInfo())
    with torch.no_grad(), torch.autocast(**BF16):
        values = net(ids, mask) if which == "critic" else net.token_values(ids, mask)
        hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    assert values.dtype is torch.float32
    with torch.no_grad():
        direct = net.head(hidden.float())  # the same hidden state, the head in fp32 outside autocast
        with torch.autocast(**BF16):
            assert (net.head(hidden).float() - direct).abs().max() > 1e-3  # a bf16 head would differ
    if which == "critic":
        assert torch.equal(values[:, 1:], direct[:, :-1])
    else:
        assert torch.equal(values, direct.squeeze(-1))


def _losses(model, ids, mask, scored, autocast: bool) -> dict[str, torch.Tensor]:
    """SFT NLL, DPO, PPO and Bradley-Terry losses from one tiny LM, fp32 or under bf16 autocast."""
    with torch.autocast(**BF16, enabled=autocast):
        logp = per_row(scored_logprobs(model, ids, scored, attention_mask=mask), scored)  # (B, T) fp32
    assert logp.dtype is torch.float32
    seq = logp.sum(-1)  # (B,)
    n = scored.sum(-1)
    # fixed, precision-independent stand-ins for rollout constants (old log-probs, advantages, references)
    gen = torch.Generator().manual_seed(1)
    old = -2.5 + 0.3 * torch.randn(logp.shape, generator=gen)
    adv = torch.randn(logp.shape, generator=gen)
    ref = seq.detach().float().round() + torch.randn(seq.shape, generator=gen)
    return {
        "sft": sft_nll(seq, n),
        "dpo": dpo_loss(seq[0::2], seq[1::2], ref[0::2], ref[1::2], beta=0.1)[0],
        "ppo": ppo_policy_loss(logp, torch.where(scored, old, 0.0), adv, scored.float(), clip_eps=0.2)[0],
        "bt": bradley_terry_loss(seq[0::2] / n[0::2], seq[1::2] / n[1::2])[0],
    }


def test_bf16_and_fp32_losses_agree_on_a_tiny_model():
    """The same weights and batch: every loss under bf16 autocast within 0.2% (relative) of fp32, and the
    gradients' direction the same (cosine > 0.999). Measured over init seeds 0, 1, 2: the largest relative
    gap was 1.7e-4 (DPO, seed 1), the smallest gradient cosine 0.999994; the bound leaves 10× room."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config()).train()
    ids = torch.randint(0, 300, (4, 24))
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0  # padding
    scored = mask.bool().clone()
    scored[:, :8] = False  # the "prompt"
    out = {}
    for autocast in (False, True):
        model.zero_grad()
        losses = _losses(model, ids, mask, scored, autocast)
        sum(losses.values()).backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        out[autocast] = ({k: v.item() for k, v in losses.items()}, grad)
    (fp32, g32), (bf16, g16) = out[False], out[True]
    for k in fp32:
        assert bf16[k] == pytest.approx(fp32[k], rel=2e-3), (k, fp32[k], bf16[k])
    assert fp32 != bf16  # autocast did engage
    assert torch.nn.functional.cosine_similarity(g32, g16, dim=0) > 0.999


def _losses_of(stage_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (stage_dir / "log.jsonl").read_text().splitlines()]


def test_bf16_stage_follows_fp32(tmp_path):
    """The pretrain stage with ``mixed_precision: bf16`` (accelerate's CPU autocast) and with ``no``: the same
    6-step loss trajectory within 0.1% (measured: 1.1e-5 at most), and bf16 did change the figures (autocast
    engaged)."""
    from conftest import tiny_pipeline_overrides

    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PATH": ""}
    runs = {}
    for mp in ("no", "bf16"):
        out = tmp_path / mp
        ov = tiny_pipeline_overrides(out) + ["pretrain.max_steps=6", f"pretrain.mixed_precision={mp}"]
        for stage in ("data", "pretrain"):
            r = subprocess.run([sys.executable, "-m", "rlhfkit.cli", stage, *ov], env=env, capture_output=True, text=True)
            assert r.returncode == 0, r.stderr[-2000:]
        runs[mp] = _losses_of(out / "pretrain")
    assert len(runs["no"]) == len(runs["bf16"]) == 6
    assert runs["bf16"] == pytest.approx(runs["no"], rel=1e-3)
    assert runs["bf16"] != runs["no"]


def test_frozen_reward_model_loads_in_bf16_with_an_fp32_head(tiny_lm_dir, tmp_path):
    """``load_reward_model(dtype=bf16)`` (PPO's reward models under bf16): the backbone in bf16, the head in
    fp32, and scores within bf16's rounding of the fp32 model's."""
    from rlhfkit.models.reward_files import build_scalar_model, load_reward_model, save_scalar_model

    net, tok = build_scalar_model(tiny_lm_dir, kind="reward", seed=1)
    save_scalar_model(net, tok, tmp_path / "rm")
    full, half = load_reward_model(tmp_path / "rm"), load_reward_model(tmp_path / "rm", dtype=torch.bfloat16)
    assert {p.dtype for p in half.net.backbone.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in half.net.head.parameters()} == {torch.float32}
    prompts, responses = ["What is 2 + 3?"] * 3, ["2 + 3 = 5\nThe answer is 5.", "5", "I cannot tell."]
    a, b = full.score(prompts, responses), half.score(prompts, responses)
    assert a != b and b == pytest.approx(a, abs=0.05)


def test_one_pipeline_run_takes_a_precision_per_stage(tmp_path):
    """One process runs data (full precision), pretrain under bf16 and SFT in full precision again. accelerate's
    process-wide state refuses a second precision (``ValueError: AcceleratorState has already been initialized``)
    unless ``make_accelerator`` rebuilds it. The bf16 pretrain's losses equal those of a bf16 pretrain run on its
    own, and differ from a full-precision one (bf16 was engaged)."""
    from accelerate.state import AcceleratorState
    from conftest import tiny_pipeline_overrides

    from rlhfkit.cli import main

    def run(out, stages, *extra):
        ov = [o for o in tiny_pipeline_overrides(out) if not o.startswith(("stages=", "out="))]
        assert main(["quickstart", "--out", str(out), *ov, f"stages=[{stages}]", *extra]) == 0
        return _losses_of(out / "pretrain")

    mixed = run(tmp_path / "run", "data, pretrain, sft", "pretrain.mixed_precision=bf16", "sft.mixed_precision=no")
    assert AcceleratorState().mixed_precision == "no"  # the last stage's
    alone = run(tmp_path / "alone", "data, pretrain", "pretrain.mixed_precision=bf16")
    full = run(tmp_path / "full", "data, pretrain", "pretrain.mixed_precision=no")
    assert len(mixed) == 4 and mixed == alone
    assert mixed != full
