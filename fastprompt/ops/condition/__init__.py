"""condition: the conditioning MLP whose output shifts every context token (CoCoOp's meta-net, CaPT, SoftCPT).

See :func:`fastprompt.ops.condition.reference.condition_reference` for the exact definition.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastprompt.ops._dispatch import cast_inputs_to_autocast, register_op
from fastprompt.ops.condition.reference import condition_reference

__all__ = ["condition", "condition_reference", "OP"]

# Autocast runs the reference's Linear layers in its low-precision dtype.
OP = register_op("condition", backends={"triton": "triton_impl"}, preference={"cuda": ("triton",), "cpu": ()},
                 prepare=cast_inputs_to_autocast)


def condition(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: Optional[torch.Tensor],
    b2: Optional[torch.Tensor],
    activation: str = "relu",
    negative_slope: float = 0.01,
    scale: float = 1.0,
    backend: Optional[str] = None,
    strict: bool = True,
) -> torch.Tensor:
    """Per-row conditional shift, dispatched by backend.

    Shapes: x [B, Din], w1 [Dh, Din], b1 [Dh] | None, w2 [Dout, Dh] | None, b2 [Dout] | None -> [B, Dout]
    (``act((scale * x) @ w1.T + b1) @ w2.T + b2``; ``w2 = None`` gives one linear layer). See
    ``condition_reference`` for the formula.
    """
    return OP(x, w1, b1, w2, b2, activation, negative_slope, scale, backend=backend, strict=strict, device=x.device)
