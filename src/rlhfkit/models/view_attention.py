"""Attention over one packed, unpadded row of tokens, in which each token attends causally within its *view*.

A view is a list of positions in the row read as one causal sequence. DPO packs each pair as
``[prompt, chosen, rejected]`` with no padding: chosen's view is (prompt, chosen) and rejected's
is (prompt, rejected), so each prompt is encoded once and rejected never sees chosen. Everything
outside attention (projections, MLP, norms, the LM head: most of the compute of a small model)
then runs on real tokens only, never on padding; attention itself runs on the views, gathered
into a right-padded (views, L) batch, with the model's own ``sdpa`` kernel.

It plugs in through transformers' ``AttentionInterface``, so the model's own layers, RoPE
(``position_ids`` restart for each view's response) and weights are used unchanged; only the
attention pattern differs. Gradients flow through the gathers, so this computes the same function
as running each view as its own padded sequence (to float rounding; tested against it).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from transformers import AttentionInterface, PreTrainedModel

VIEW_ATTENTION = "rlhfkit_view_attention"
"""the name under which ``view_attention_forward`` is registered with transformers"""


def view_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                           token_views: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs):
    """query (1, h, N, d), key and value (1, h_kv, N, d) → ((1, N, h, d), None), as transformers' attention functions.

    ``token_views = (index, source)``: ``index`` (V, L) holds each view's row positions, right-padded
    with any valid position (a real query never sees the padding: attention is causal and padding
    comes after every real token of its view); ``source`` (N,) holds, for each token of the row, the
    flat position (view · L + column) of the one view whose output it takes.
    """
    if token_views is None:
        raise ValueError("view attention needs token_views=(index, source); use it through view_attention()")
    if attention_mask is not None:
        raise ValueError("view attention takes its pattern from token_views; the model built an attention mask")
    # Plain causal attention only: ``supports_view_attention`` keeps models with soft-capping, attention sinks
    # or sliding windows on the concatenated path, so reaching one of these is a caller's error.
    index, source = token_views
    n_views, length = index.shape
    window = kwargs.get("sliding_window")
    for name, given in (("softcap", kwargs.get("softcap") is not None), ("s_aux", kwargs.get("s_aux") is not None),
                        (f"sliding_window {window} < {length} tokens", window is not None and window < length)):
        if given:
            raise ValueError(f"view attention is plain causal attention and got {name}; "
                             "check supports_view_attention(model) before using it")

    def gather(x):  # (1, heads, N, d) → (V, heads, L, d)
        return x[0].index_select(1, index.reshape(-1)).unflatten(1, (n_views, length)).transpose(0, 1)

    q, k, v = gather(query), gather(key), gather(value)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=q.shape[1] != k.shape[1])  # (V, h, L, d)
    out = out.transpose(1, 2).flatten(0, 1)  # (V·L, h, d)
    return out.index_select(0, source).unsqueeze(0), None  # (1, N, h, d)


def _register() -> None:
    AttentionInterface.register(VIEW_ATTENTION, view_attention_forward)


def _unwrap(model):
    while hasattr(model, "module"):  # DDP / FSDP / DeepSpeed wrappers
        model = model.module
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):  # a LoRA model: its adapted base
        model = model.get_base_model()
    return model


def supports_view_attention(model) -> bool:
    """Whether ``model`` can run view attention: its attention goes through ``AttentionInterface``, activation
    checkpointing is off, transformers' or torch's (a checkpointed layer re-runs its forward during backward, after ``view_attention``
    has restored the model's own attention, which would attend across views), and its attention is plain
    causal attention: no logit soft-capping (Gemma-2), no sliding window (Mistral, Gemma-2) and no attention
    sinks (gpt-oss). Any other model takes the concatenated path."""
    inner = _unwrap(model)
    if not (isinstance(inner, PreTrainedModel) and inner.is_backend_compatible()
            and inner._can_set_attn_implementation() and not inner.is_activation_checkpointing):
        return False
    cfg = inner.config
    layer_types = getattr(cfg, "layer_types", None)
    sliding = ("sliding_attention" in layer_types if layer_types else
               getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True) is not False)
    sinks = any(hasattr(m, "sinks") for m in inner.modules())
    # torch's checkpoint_wrapper (FSDP's activation checkpointing, applied by ``accelerator.prepare``) re-runs a
    # layer in backward just as transformers' own does; ``is_activation_checkpointing`` does not see it.
    wrapped = any(hasattr(m, "_checkpoint_wrapped_module") for m in inner.modules())
    return getattr(cfg, "attn_logit_softcapping", None) is None and not sliding and not sinks and not wrapped


@contextlib.contextmanager
def view_attention(model) -> Iterator[None]:
    """Within the block, ``model`` attends by views (pass ``token_views=`` to its forward); its own attention after."""
    inner = _unwrap(model)
    previous = inner.config._attn_implementation
    _register()
    inner.set_attn_implementation(VIEW_ATTENTION)
    try:
        yield
    finally:
        inner.set_attn_implementation(previous)
