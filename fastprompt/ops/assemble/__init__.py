"""assemble: packed prompt input embeddings (context + conditional shift + class tokens + positions).

See :func:`fastprompt.ops.assemble.reference.assemble_reference` for the exact definition.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastprompt.ops._dispatch import cast_floating, register_op
from fastprompt.ops.assemble.reference import assemble_reference

__all__ = ["assemble", "assemble_reference", "OP"]

def _promote(args, low):
    # The kernels take one dtype; the reference's additions and concatenation promote (autocast leaves them
    # alone), so mixed inputs (e.g. a bf16 shift from an autocast meta-net) are promoted the same way.
    ctx, shift, fixed, slot, pos, pos_offset, g_idx, c_idx = args
    dtype = ctx.dtype
    for t in (shift, fixed, pos):
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    ctx, shift, fixed, pos = cast_floating(dtype, ctx, shift, fixed, pos)
    return (ctx, shift, fixed, slot, pos, pos_offset, g_idx, c_idx), lambda out: out


OP = register_op(
    "assemble",
    backends={"compiled": "compiled", "triton": "triton_impl"},
    preference={"cuda": ("compiled", "triton"), "cpu": ("compiled",)},
    prepare=_promote,
)


def assemble(
    ctx: torch.Tensor,
    shift: Optional[torch.Tensor],
    fixed: torch.Tensor,
    slot: torch.Tensor,
    pos: torch.Tensor,
    pos_offset: int,
    g_idx: torch.Tensor,
    c_idx: torch.Tensor,
    backend: Optional[str] = None,
    strict: bool = True,
) -> torch.Tensor:
    """Packed prompt embeddings, dispatched by backend.

    Shapes: ctx [G, M, D], shift [G, D] | None, fixed [C, L, D], slot [C, L] int64, pos [P_total, D],
    g_idx [N] int64, c_idx [N] int64  ->  [N, L, D]. See ``assemble_reference`` for the formula.
    """
    return OP(ctx, shift, fixed, slot, pos, pos_offset, g_idx, c_idx, backend=backend, strict=strict, device=ctx.device)
