"""An export-friendly forward for OpenCLIP's standard VisionTransformer, used only while exporting to ONNX.

The generic export of ViT-B-32-256 spends ~12 % of its int8 run time outside the matrix products: a fp32
patch-embedding ``Conv`` (5.6 %, a quantised ``ConvInteger`` was slower still) and the ``Transpose`` chain
of ``nn.MultiheadAttention`` (6.2 %). During the export this module swaps in the same arithmetic written as

* patch embedding = patchify (one reshape/transpose) + one ``MatMul`` with the conv weight, which int8
  quantisation then covers like every other linear layer;
* self-attention = one ``MatMul`` for q/k/v, one permute into heads, two batched ``MatMul`` and a
  ``Softmax``, one permute back.

``benchmarks/bench_model_speed.py`` measures what the swap buys (the stock graph is one of its rows); the
cosine to the torch model is unchanged. The swap is reversible and applies only to the shapes it was written
for (checked by :func:`applicable`); the exported file is still checked against the untouched torch model
on a probe batch, and any other architecture exports as it is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


def applicable(model: Any) -> bool:
    """True for an OpenCLIP ``VisionTransformer`` with the standard patch embedding and self-attention."""
    import torch

    visual = getattr(model, "visual", model)
    conv = getattr(visual, "conv1", None)
    transformer = getattr(visual, "transformer", None)
    if not (
        isinstance(conv, torch.nn.Conv2d)
        and conv.bias is None
        and conv.groups == 1
        and conv.kernel_size == conv.stride
        and conv.padding in ((0, 0), 0)
        and conv.dilation == (1, 1)
        and hasattr(visual, "_embeds")  # the open_clip method this module replaces
        and isinstance(getattr(visual, "class_embedding", None), torch.nn.Parameter)
        and isinstance(getattr(visual, "positional_embedding", None), torch.nn.Parameter)
        and isinstance(getattr(visual, "patch_dropout", None), torch.nn.Module)
        and not visual.training
        and transformer is not None
        and getattr(transformer, "batch_first", False)
        and hasattr(transformer, "resblocks")
    ):
        return False
    for block in transformer.resblocks:
        attn = getattr(block, "attn", None)
        if not (
            isinstance(attn, torch.nn.MultiheadAttention)
            and attn.batch_first
            and attn._qkv_same_embed_dim
            and attn.in_proj_weight is not None
            and attn.bias_k is None
            and not attn.add_zero_attn
        ):
            return False
    return True


@contextlib.contextmanager
def export_friendly(model: Any) -> Iterator[None]:
    """Within the block, ``model`` computes the same function through the export-friendly forward above."""
    visual = getattr(model, "visual", model)
    patched: list[tuple[Any, str]] = []
    try:
        visual._embeds = _embeds(visual)
        patched.append((visual, "_embeds"))
        for block in visual.transformer.resblocks:
            block.attn.forward = _self_attention(block.attn)
            patched.append((block.attn, "forward"))
        yield
    finally:
        for obj, name in patched:
            delattr(obj, name)  # the instance attribute goes; the class method is visible again


def _embeds(visual: Any) -> Callable[[Any], Any]:
    import torch

    conv = visual.conv1
    p_h, p_w = conv.kernel_size

    def embeds(x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        gh, gw = h // p_h, w // p_w
        # [B, C, gh, P, gw, P] -> [B, gh*gw, C*P*P]: each row is one patch in the conv weight's (c, y, x) order.
        patches = (
            x.reshape(b, c, gh, p_h, gw, p_w).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * p_h * p_w)
        )
        # The weight is reshaped inside the traced function so the exporter keeps it a parameter.
        tokens = torch.matmul(patches, conv.weight.reshape(conv.out_channels, -1).t())
        cls = visual.class_embedding.reshape(1, 1, -1).expand(b, 1, -1).to(tokens.dtype)
        tokens = torch.cat([cls, tokens], dim=1) + visual.positional_embedding.to(tokens.dtype)
        return visual.ln_pre(visual.patch_dropout(tokens))

    return embeds


def _self_attention(mha: Any) -> Callable[..., Any]:
    import torch
    import torch.nn.functional as F

    heads = mha.num_heads
    original = type(mha).forward

    def forward(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> tuple[Any, None]:
        if key is not query or value is not query or args or kwargs.get("attn_mask") is not None:
            return original(mha, query, key, value, *args, **kwargs)  # not plain self-attention
        b, n, d = query.shape
        dh = d // heads
        qkv = F.linear(query, mha.in_proj_weight, mha.in_proj_bias)
        qkv = qkv.reshape(b, n, 3, heads, dh).permute(2, 0, 3, 1, 4)  # [3, B, heads, N, dh]
        q, k, v = qkv[0], qkv[1], qkv[2]
        weights = torch.matmul(q * dh**-0.5, k.transpose(-2, -1)).softmax(dim=-1)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(b, n, d)
        return F.linear(out, mha.out_proj.weight, mha.out_proj.bias), None

    return forward
