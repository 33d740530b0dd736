"""PPO's value model: a transformer backbone and a linear value head, V(x_<t) at every action position.

The critic starts from a directory's backbone (the reward model's, by default, or the policy's)
and, when that directory is a reward model, from its scalar head too: V(x_<t) then starts near the
reward model's opinion of the prefix, so early advantages are informative instead of the noise of
a random head. It is built ready for RL: dropout off (the value loss compares values of one
function), LoRA on the backbone and gradient checkpointing as the stage asks.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModel

from rlhfkit.models.precision import fp32_head
from rlhfkit.models.reward import HEAD_WEIGHTS
from rlhfkit.models.trainable import LoRAConfig, add_lora, disable_dropout


class Critic(torch.nn.Module):
    """A transformer backbone and a linear head of ``n_values`` outputs (reward value, cost value).

    forward(input_ids, attention_mask) (B, T) → (B, T, n_values) aligned with actions: ``out[:, t]``
    is V(x_<t), read from the hidden state at t − 1 (the state before x_t is emitted); ``out[:, 0]`` is 0.
    """

    def __init__(self, backbone: torch.nn.Module, n_values: int):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(backbone.config.hidden_size, n_values)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)
        self.initialised_from_head = False  # set by build_critic: row 0 copied from a reward model's head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, h)
        values = fp32_head(self.head, hidden)  # (B, T, n_values): fp32 whatever the backbone's dtype or autocast
        return torch.nn.functional.pad(values[:, :-1], (0, 0, 1, 0))  # shift: V(x_<t) at t


def reward_head(path: Path, hidden: int) -> dict | None:
    """The reward model's head, ``{"weight": (1, hidden), "bias": (1,)}``, if ``path`` is a reward-model directory."""
    f = Path(path) / HEAD_WEIGHTS
    if not f.exists():
        return None
    head = load_file(str(f))
    if tuple(head["weight"].shape) != (1, hidden):
        raise ValueError(f"{f}: head weight {tuple(head['weight'].shape)} does not fit hidden size {hidden}")
    return head


def build_critic(path: Path, n_values: int, seed: int, lora: LoRAConfig | None = None,
                 gradient_checkpointing: bool = False) -> Critic:
    """Critic from ``path``'s backbone; its first head row (the reward value) from the reward model's
    scalar head when ``path`` is a reward model. Dropout off; ``lora`` adapters on the backbone (the
    value head trains fully); activations recomputed in the backward pass with ``gradient_checkpointing``.
    """
    torch.manual_seed(seed)
    backbone = AutoModel.from_pretrained(str(path))
    critic = Critic(backbone, n_values)
    head = reward_head(Path(path), backbone.config.hidden_size)
    if head is not None:
        with torch.no_grad():  # row 0 (reward value) from the RM; a cost value row stays 0
            critic.head.weight[0].copy_(head["weight"][0].float())
            critic.head.bias[0].copy_(head["bias"][0].float())
    critic.initialised_from_head = head is not None
    disable_dropout(critic)
    if gradient_checkpointing:
        critic.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None and lora.enabled:
        critic.backbone = add_lora(critic.backbone, lora)
    return critic
