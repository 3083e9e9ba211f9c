"""Eager reference of the conditioning network: a small MLP whose output shifts every context token."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastprompt.ops._dispatch import register_impl

ACTIVATIONS = ("relu", "leaky_relu", "none")


@register_impl("condition", backend="reference")
def condition_reference(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: Optional[torch.Tensor],
    b2: Optional[torch.Tensor],
    activation: str = "relu",
    negative_slope: float = 0.01,
    scale: float = 1.0,
) -> torch.Tensor:
    """Per-row conditional shift of the context.

    Two-layer form (CoCoOp meta-net: relu; CaPT: leaky_relu, input scaled)::

        shift = act((scale * x) @ w1.T + b1) @ w2.T + b2

    One-layer form (SoftCPT's bias-free linear meta-network): ``w2 = None`` gives ``(scale * x) @ w1.T + b1``.

    Args:
        x:  [B, Din] conditioning input (CoCoOp: normalised image features; CaPT: class text features).
        w1: [Dh, Din], b1: [Dh] or None; w2: [Dout, Dh] or None, b2: [Dout] or None (nn.Linear layout).
        activation: "relu", "leaky_relu" (with negative_slope) or "none", between the two layers.
        scale: multiplies x first.

    Returns:
        [B, Dout] in x's dtype. Differentiable w.r.t. x, w1, b1, w2, b2.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    h = F.linear(x * scale if scale != 1.0 else x, w1, b1)
    if w2 is None:
        return h
    if activation == "relu":
        h = F.relu(h)
    elif activation == "leaky_relu":
        h = F.leaky_relu(h, negative_slope)
    return F.linear(h, w2, b2)
