"""The optimizer every training loop builds (training.make_optimizer_and_scheduler): fused AdamW where it can run,
the same update as the default AdamW to float rounding."""
import torch

from rlhfkit.training import TrainConfig, make_optimizer_and_scheduler


def _train(fused: bool, steps: int = 5) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1, warmup_steps=0, scheduler="constant")
    opt, sched = make_optimizer_and_scheduler(model, cfg, total_steps=steps)
    assert opt.defaults["fused"] is True  # float parameters on the CPU: the fused kernel
    if not fused:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if fused:
            sched.step()  # constant: the unfused arm's learning rate is the same at every step
    return [p.detach().clone() for p in model.parameters()]


def test_fused_adamw_gives_the_default_adamws_weights():
    for a, b in zip(_train(fused=True), _train(fused=False)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()
