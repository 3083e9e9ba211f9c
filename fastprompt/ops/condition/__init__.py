"""condition: the conditioning MLP whose output shifts every context token (CoCoOp's meta-net, CaPT, SoftCPT).

See :func:`fastprompt.ops.condition.reference.condition_reference` for the exact definition.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastprompt.ops._dispatch import OpBackends, autocast_dtype, cast_floating, reference_ok, triton_ok
from fastprompt.ops.condition.reference import condition_reference

__all__ = ["condition", "condition_reference", "BACKENDS"]

BACKENDS = OpBackends(
    "condition",
    {"reference": reference_ok, "triton": triton_ok},
    {"cuda": ("triton",), "cpu": ()},
)


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
    name = BACKENDS.resolve(backend, x.device, strict)
    low = autocast_dtype(x.device)
    if low is not None and name != "reference":
        # Autocast runs the reference's Linear layers in its low-precision dtype.
        x, w1, b1, w2, b2 = cast_floating(low, x, w1, b1, w2, b2)
        with torch.autocast(x.device.type, enabled=False):
            return condition(x, w1, b1, w2, b2, activation, negative_slope, scale, backend=name)
    if name == "triton":
        from fastprompt.ops.condition.triton import condition_triton

        return condition_triton(x, w1, b1, w2, b2, activation, negative_slope, scale)
    return condition_reference(x, w1, b1, w2, b2, activation, negative_slope, scale)
