"""Eager reference of VAPT's per-layer prompt generator (Minhchuyentoancbn/VAPT, ``PromptedTransformerAdaptive``).

Written as the official modules compute it: ``nn.LayerNorm`` -> ``ChannelWiseConv2d`` (one K x K kernel expanded
over all channels, ``groups = D``, no bias, no padding) -> ``Dropout2d(0.1)`` -> token-wise ``nn.Linear(H'W' ->
N)`` -> ``PromptMLP`` (bias-free ``Linear(D -> Dh)``, ReLU, dropout on the ReLU output, bias-free
``Linear(Dh -> D)``, times ``scale``, plus the residual input). The official code follows the code, not the poster
(which has no residual and no token-projector bias).

Dropout is expressed by *masks* so the fused kernels can reproduce it exactly: ``chan_mask [B, D]`` is
Dropout2d's per-(sample, channel) factor (0 or 1 / (1 - p)) and ``hidden_mask [B, N, Dh]`` the MLP dropout's
factor. ``None`` = no dropout (eval). :func:`dropout_masks` draws them as ``F.dropout`` / ``F.dropout2d`` do on
the CPU (same generator calls, in the same order), so a seeded run reproduces the official modules' masks there.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from fastprompt.ops._dispatch import register_impl

__all__ = ["vapt_prompts_reference", "dropout_masks", "check_vapt_args"]


def check_vapt_args(x, ln_weight, ln_bias, kernel, tok_weight, tok_bias, w1, w2, grid, chan_mask, hidden_mask) -> None:
    """Shape checks with clear errors (ValueError)."""
    if x.dim() != 3:
        raise ValueError(f"vapt_prompts: x must be [B, H*W, D] patch tokens, got {tuple(x.shape)}")
    B, P, D = x.shape
    H, W = grid
    if H * W != P:
        raise ValueError(f"vapt_prompts: grid {grid} has {H * W} patches, x has {P}")
    if kernel.dim() != 2 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] > min(H, W):
        raise ValueError(f"vapt_prompts: kernel must be [K, K] with K <= {min(H, W)}, got {tuple(kernel.shape)}")
    K = kernel.shape[0]
    Pc = (H - K + 1) * (W - K + 1)
    if tok_weight.dim() != 2 or tok_weight.shape[1] != Pc:
        raise ValueError(f"vapt_prompts: tok_weight must be [N, {Pc}], got {tuple(tok_weight.shape)}")
    N = tok_weight.shape[0]
    for name, t, shape in (("ln_weight", ln_weight, (D,)), ("ln_bias", ln_bias, (D,)), ("tok_bias", tok_bias, (N,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"vapt_prompts: {name} must be {list(shape)}, got {tuple(t.shape)}")
    if w1.dim() != 2 or w1.shape[1] != D or tuple(w2.shape) != (D, w1.shape[0]):
        raise ValueError(f"vapt_prompts: w1 must be [Dh, {D}] and w2 [{D}, Dh], got {tuple(w1.shape)}, {tuple(w2.shape)}")
    if chan_mask is not None and tuple(chan_mask.shape) != (B, D):
        raise ValueError(f"vapt_prompts: chan_mask must be [{B}, {D}], got {tuple(chan_mask.shape)}")
    if hidden_mask is not None and tuple(hidden_mask.shape) != (B, N, w1.shape[0]):
        raise ValueError(f"vapt_prompts: hidden_mask must be [{B}, {N}, {w1.shape[0]}], got {tuple(hidden_mask.shape)}")


def dropout_masks(B: int, D: int, N: int, Dh: int, p_chan: float, p_hidden: float, dtype, device,
                  generator: Optional[torch.Generator] = None) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(chan_mask [B, D] | None, hidden_mask [B, N, Dh] | None): scaled Bernoulli keep-masks (None when p = 0).

    Drawn in the order the official forward draws them (Dropout2d on the conv output, then the MLP dropout),
    each as ``empty(...).bernoulli_(1 - p).div_(1 - p)`` like ATen's CPU dropout.
    """
    def draw(shape, p):
        if p <= 0.0:
            return None
        if p >= 1.0:
            return torch.zeros(shape, dtype=dtype, device=device)
        return torch.empty(shape, dtype=dtype, device=device).bernoulli_(1 - p, generator=generator).div_(1 - p)

    return draw((B, D), p_chan), draw((B, N, Dh), p_hidden)


@register_impl("vapt_prompts", backend="reference")
def vapt_prompts_reference(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    kernel: torch.Tensor,
    tok_weight: torch.Tensor,
    tok_bias: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    grid: Tuple[int, int],
    chan_mask: Optional[torch.Tensor] = None,
    hidden_mask: Optional[torch.Tensor] = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """One layer's VAPT prompts from its patch tokens.

    Args:
        x: [B, P = H*W, D] patch tokens entering the block (row-major grid; CLS and prompt rows removed —
            LayerNorm is per token, so dropping CLS before or after it is the same).
        ln_weight, ln_bias: [D]; eps: LayerNorm epsilon.
        kernel: [K, K] conv kernel shared by all channels (the official ``[1, 1, K, K]`` parameter, squeezed).
        tok_weight: [N, H'W'] and tok_bias [N], H' = H - K + 1: the token-wise projector.
        w1: [Dh, D], w2: [D, Dh]: the shared feature projector (bias-free).
        grid: (H, W). chan_mask: [B, D] | None; hidden_mask: [B, N, Dh] | None (see module doc).
        scale: PromptMLP's scale (1.0 unless ``LEARNABLE_SCALE``).

    Returns:
        [B, N, D] prompts ``t + scale * (mask * relu(t @ w1.T)) @ w2.T`` with ``t`` the projected tokens.
    """
    check_vapt_args(x, ln_weight, ln_bias, kernel, tok_weight, tok_bias, w1, w2, grid, chan_mask, hidden_mask)
    B, P, D = x.shape
    H, W = grid
    K = kernel.shape[0]
    y = F.layer_norm(x, (D,), ln_weight, ln_bias, eps)
    y = y.permute(0, 2, 1).reshape(B, D, H, W)
    z = F.conv2d(y, kernel.view(1, 1, K, K).expand(D, 1, K, K), groups=D)  # [B, D, H', W']
    if chan_mask is not None:
        z = z * chan_mask.view(B, D, 1, 1)
    t = F.linear(z.reshape(B, D, -1), tok_weight, tok_bias).permute(0, 2, 1)  # [B, N, D]
    h = F.relu(F.linear(t, w1))
    if hidden_mask is not None:
        h = h * hidden_mask
    return F.linear(h, w2) * scale + t
