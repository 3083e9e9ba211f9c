"""pool_project: EOT gather, final LayerNorm, projection and L2 normalisation (the end of CLIP's encode_text).

See :func:`fastprompt.ops.pool_project.reference.pool_project_reference` for the exact definition.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastprompt.ops._dispatch import OpBackends, autocast_dtype, cast_floating, compiled_ok, reference_ok, triton_ok
from fastprompt.ops.pool_project.reference import pool_project_reference

__all__ = ["pool_project", "pool_project_reference", "BACKENDS"]

BACKENDS = OpBackends(
    "pool_project",
    {"reference": reference_ok, "compiled": compiled_ok, "triton": triton_ok},
    {"cuda": ("compiled", "triton"), "cpu": ("compiled",)},
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
    name = BACKENDS.resolve(backend, x.device, strict)
    low = autocast_dtype(x.device)
    if low is not None and name != "reference":
        # As autocast runs the reference: LayerNorm in float32, the projection GEMM in the autocast dtype. The
        # kernel keeps float32 through the projection (a tighter result) and returns the reference's dtype.
        x32, w32, b32, p32 = cast_floating(torch.float32, x, ln_weight, ln_bias, proj)
        with torch.autocast(x.device.type, enabled=False):
            out = pool_project(x32, rows, w32, b32, eps, p32, normalize, backend=name)
        return out.to(low) if proj is not None else out
    if name == "compiled":
        from fastprompt.ops.pool_project.compiled import pool_project_compiled

        return pool_project_compiled(x, rows, ln_weight, ln_bias, eps, proj, normalize)
    if name == "triton":
        from fastprompt.ops.pool_project.triton import pool_project_triton

        return pool_project_triton(x, rows, ln_weight, ln_bias, eps, proj, normalize)
    return pool_project_reference(x, rows, ln_weight, ln_bias, eps, proj, normalize)
