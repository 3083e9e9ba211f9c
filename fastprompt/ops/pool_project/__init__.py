"""pool_project: EOT gather, final LayerNorm, projection and L2 normalisation (the end of CLIP's encode_text).

See :func:`fastprompt.ops.pool_project.reference.pool_project_reference` for the exact definition.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastprompt.ops._dispatch import cast_floating, register_op
from fastprompt.ops.pool_project.reference import pool_project_reference

__all__ = ["pool_project", "pool_project_reference", "OP"]

def _autocast_as_reference(args, low):
    # As autocast runs the reference: LayerNorm in float32, the projection GEMM in the autocast dtype. The kernel
    # keeps float32 through the projection (a tighter result) and returns the reference's dtype.
    if low is None:
        return args, lambda out: out
    x, rows, ln_weight, ln_bias, eps, proj, normalize = args
    x, ln_weight, ln_bias, proj_32 = cast_floating(torch.float32, x, ln_weight, ln_bias, proj)
    post = (lambda out: out.to(low)) if proj is not None else (lambda out: out)
    return (x, rows, ln_weight, ln_bias, eps, proj_32, normalize), post


OP = register_op(
    "pool_project",
    backends={"compiled": "compiled", "triton": "triton_impl"},
    preference={"cuda": ("compiled", "triton"), "cpu": ("compiled",)},
    prepare=_autocast_as_reference,
)


def pool_project(
    x: torch.Tensor,
    rows: Optional[torch.Tensor],
    ln_weight: Optional[torch.Tensor],
    ln_bias: Optional[torch.Tensor],
    eps: float,
    proj: Optional[torch.Tensor],
    normalize: bool,
    backend: Optional[str] = None,
    strict: bool = True,
) -> torch.Tensor:
    """Pooled, projected text features, dispatched by backend.

    Shapes: x [T, W], rows [N] int64 | None (N = T), ln_weight / ln_bias [W] | None, proj [W, E] | None (E = W)
    ->  [N, E] in x's dtype, differentiable w.r.t. x only. See ``pool_project_reference`` for the formula.
    """
    return OP(x, rows, ln_weight, ln_bias, eps, proj, normalize, backend=backend, strict=strict, device=x.device)
