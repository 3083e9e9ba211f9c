"""assemble: packed prompt input embeddings (context + conditional shift + class tokens + positions).

See :func:`fastprompt.ops.assemble.reference.assemble_reference` for the exact definition.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastprompt.ops._dispatch import OpBackends, autocast_dtype, cast_floating, compiled_ok, reference_ok, triton_ok
from fastprompt.ops.assemble.reference import assemble_reference

__all__ = ["assemble", "assemble_reference", "BACKENDS"]

BACKENDS = OpBackends(
    "assemble",
    {"reference": reference_ok, "compiled": compiled_ok, "triton": triton_ok},
    {"cuda": ("compiled", "triton"), "cpu": ("compiled",)},
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
    name = BACKENDS.resolve(backend, ctx.device, strict)
    if name != "reference":
        # The kernels take one dtype; the reference's additions and concatenation promote (autocast leaves
        # them alone), so mixed inputs (e.g. a bf16 shift from an autocast meta-net) are promoted the same way.
        floats = [t for t in (ctx, shift, fixed, pos) if t is not None]
        dtype = floats[0].dtype
        for t in floats[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        ctx, shift, fixed, pos = cast_floating(dtype, ctx, shift, fixed, pos)
        if autocast_dtype(ctx.device) is not None:
            with torch.autocast(ctx.device.type, enabled=False):
                return assemble(ctx, shift, fixed, slot, pos, pos_offset, g_idx, c_idx, backend=name)
    if name == "compiled":
        from fastprompt.ops.assemble.compiled import assemble_compiled

        return assemble_compiled(ctx, shift, fixed, slot, pos, pos_offset, g_idx, c_idx)
    if name == "triton":
        from fastprompt.ops.assemble.triton import assemble_triton

        return assemble_triton(ctx, shift, fixed, slot, pos, pos_offset, g_idx, c_idx)
    return assemble_reference(ctx, shift, fixed, slot, pos, pos_offset, g_idx, c_idx)
