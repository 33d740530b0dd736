"""A PRM's second input: the step's log-likelihood under a frozen reference LM.

``reward.step_likelihood`` builds a PRM (``models.reward.ScalarModel`` of kind ``prm`` on a causal
LM) with a :class:`StepLikelihood`; :func:`fit_step_likelihood` starts its weights before training,
and ``ScalarModel.forward`` (given step spans) adds its term to each step's logit.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from rlhfkit.models.reward import causal_step_batches, positions_from_mask
from rlhfkit.models.token_logps import per_row, scored_logprobs


class StepLikelihood(nn.Module):
    """A PRM's second input: how likely each step is under a frozen reference LM (the policy's start).

    Step k covers the tokens T_k of its line (not the separator that closes it). With
    ℓ_t = log π_ref(x_t | x_<t), its features are f_k = (Σ_{t∈T_k} ℓ_t, min_{t∈T_k} ℓ_t, mean_{t∈T_k} ℓ_t),
    and the step logit gains w · (f_k − μ) / σ, where μ and σ (3,) are the features' mean and
    standard deviation over the training steps and w (3,) is learned with the rest of the PRM.

    Why: a small backbone fine-tuned on a few thousand labelled steps learns which problems are
    hard, not whether "12 - 6 = 5" is right; the language model that writes such steps puts less
    mass on a wrong result than on the right one. Self-evaluation guided decoding (Xie et al. 2023,
    arXiv 2305.00633) combines the same two signals, P_LM(step)^λ · C(step)^(1−λ), with a fixed λ;
    here the weights are fitted to the step labels. ``docs/reward_models.md`` has the measurements.
    """

    n_features = 3

    def __init__(self, lm, n_sep: int):
        super().__init__()
        self.n_sep = n_sep  # tokens of the separator that closes each step in the PRM's input (not the step's own)
        self.lm = lm.eval()
        self.lm.requires_grad_(False)
        self.weight = nn.Parameter(torch.zeros(self.n_features))
        self.register_buffer("mean", torch.zeros(self.n_features))
        self.register_buffer("std", torch.ones(self.n_features))
        self.cache: dict | None = None  # while the PRM trains: features by (row tokens, spans); see features()

    def train(self, mode: bool = True):
        super().train(mode)
        self.lm.eval()  # frozen: no dropout, whatever the PRM's mode
        return self

    @torch.no_grad()
    def features(self, input_ids, attention_mask, spans: Sequence[Sequence[tuple[int, int]]]) -> list[torch.Tensor]:
        """(B, T) right-padded ids and mask, and per row the (first, last) token index of each step →
        one (S_i, 3) tensor per row: sum, min and mean of the steps' token log-likelihoods.

        The LM is frozen, so a row's features depend on its tokens and spans alone. With ``cache`` a
        dict (``train_prm`` sets one for the length of training; ``fit_step_likelihood``'s pass over every
        training row fills it), a batch whose rows are all in it costs no LM forward: each epoch after
        that pass reuses them. A batch with any row missing runs whole and is stored. ``cache`` None
        (the default, and whenever the PRM scores new responses) stores nothing.
        """
        keys = None
        if self.cache is not None:
            lengths = attention_mask.sum(-1).tolist()
            keys = [(tuple(input_ids[row, :n].tolist()), tuple(map(tuple, row_spans)))
                    for row, (n, row_spans) in enumerate(zip(lengths, spans))]
            if all(k in self.cache for k in keys):
                return [self.cache[k] for k in keys]
        scored = torch.zeros_like(input_ids, dtype=torch.bool)  # the steps' tokens: the LM head runs only before them
        for row, row_spans in enumerate(spans):
            for first, last in row_spans:
                scored[row, max(first, 1):max(last, 1) + 1] = True
        lp = per_row(scored_logprobs(self.lm, input_ids, scored, attention_mask=attention_mask,
                                     position_ids=positions_from_mask(attention_mask)), scored)[:, 1:]  # (B, T-1)
        out = []
        for row, row_spans in enumerate(spans):
            feats = []
            for first, last in row_spans:
                v = lp[row, max(first, 1) - 1:max(last, 1)]  # lp[:, t-1] = log p(x_t | x_<t); never empty
                feats.append(torch.stack([v.sum(), v.min(), v.mean()]))
            out.append(torch.stack(feats) if feats else lp.new_zeros(0, self.n_features))
        if keys is not None:
            self.cache.update(zip(keys, out))
        return out

    def step_features(self, input_ids, attention_mask, step_spans) -> list[torch.Tensor]:
        """:meth:`features` of steps given by their ``encode_step_spans`` spans (separator included)."""
        return self.features(input_ids, attention_mask,
                             [[step_token_span(sp, self.n_sep) for sp in row] for row in step_spans])

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(S, 3) features → (S,) additions to the step logits."""
        return ((feats - self.mean) / self.std) @ self.weight


def step_token_span(span: tuple[int, int], n_sep: int) -> tuple[int, int]:
    """(first, last) of a step's own tokens, its separator left out (it follows the last step
    only in the PRM's input, not in the response, which ends with EOS); a blank step keeps it."""
    first, last = span
    return first, max(first, last - n_sep)


def fit_step_likelihood(net, tokenizer, prompts, steps, labels, batch_size: int, device) -> dict:
    """Start a ``step_likelihood`` PRM from its features' own model, before the PRM is trained.

    μ and σ of :class:`StepLikelihood` become the mean and standard deviation of the features of the
    rated training steps (``labels[i][k]`` None = unrated), then w and the head's bias are a logistic
    regression of the (possibly soft) labels on the standardized features alone (L-BFGS, BCE).
    Returns the fitted weights and the regression's loss.
    """
    lik = net.likelihood
    if lik is None:
        raise ValueError("the PRM was built without step_likelihood")
    feats, ys = [], []
    rows = iter(labels)
    for b, spans in causal_step_batches(tokenizer, net.info, prompts, steps, batch_size, device):
        for f in lik.step_features(b["input_ids"], b["attention_mask"], spans):
            for k, y in enumerate(next(rows)):
                if y is not None:
                    feats.append(f[k])
                    ys.append(float(y))
    if not feats:
        raise ValueError("no rated step to fit the step-likelihood weights on")
    x, y = torch.stack(feats).float(), torch.tensor(ys, device=feats[0].device)
    mean, std = x.mean(0), x.std(0).nan_to_num(1.0).clamp(min=1e-6)
    z = (x - mean) / std
    w = torch.zeros(lik.n_features + 1, device=z.device, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(z @ w[:-1] + w[-1], y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
        loss = nn.functional.binary_cross_entropy_with_logits(z @ w[:-1] + w[-1], y).item()
    w = w.detach()
    with torch.no_grad():
        lik.mean.copy_(mean)
        lik.std.copy_(std)
        lik.weight.copy_(w[:-1])
        net.head.bias.fill_(float(w[-1]))
    return {"weight": w[:-1].tolist(), "bias": float(w[-1]), "loss": loss, "steps": len(ys)}
