"""Eager reference of the prompt-assembly op: the contract every backend is tested against."""
from __future__ import annotations

from typing import Optional

import torch

from fastprompt.ops._dispatch import register_impl


@register_impl("assemble", backend="reference")
def assemble_reference(
    ctx: torch.Tensor,
    shift: Optional[torch.Tensor],
    fixed: torch.Tensor,
    slot: torch.Tensor,
    pos: torch.Tensor,
    pos_offset: int,
    g_idx: torch.Tensor,
    c_idx: torch.Tensor,
) -> torch.Tensor:
    """Build packed input embeddings for (context, class) pairs.

    For pair ``n`` with ``g = g_idx[n]`` and ``c = c_idx[n]``, and position ``t``::

        out[n, t] = (ctx[g, slot[c, t]] + shift[g]   if slot[c, t] >= 0
                     else fixed[c, t])              + pos[pos_offset + t]

    Args:
        ctx:   [G, M, D] learnable context vectors, one set per distinct context.
        shift: [G, D] or None; a conditional offset added to every context token of group g
               (CoCoOp's meta-net output, CaPT's class offset).
        fixed: [C, L, D] frozen token embeddings of each class's prompt positions (unused where slot >= 0).
        slot:  [C, L] int64; index into the M context vectors, or -1 for a fixed token.
        pos:   [P_total, D] positional embedding; rows pos_offset .. pos_offset+L-1 are used.
        pos_offset: absolute position of column 0 (0 for a prefix, the prefix length for a suffix).
        g_idx: [N] int64 context group of each pair.
        c_idx: [N] int64 class of each pair.

    Returns:
        [N, L, D] in ctx's dtype. Differentiable w.r.t. ctx and shift (the others are frozen).
    """
    L = slot.shape[1]
    s = slot[c_idx]  # [N, L]
    is_ctx = (s >= 0).unsqueeze(-1)  # [N, L, 1]
    ctx_rows = ctx[g_idx.unsqueeze(1), s.clamp(min=0)]  # [N, L, D]
    if shift is not None:
        ctx_rows = ctx_rows + shift[g_idx].unsqueeze(1).to(ctx.dtype)
    out = torch.where(is_ctx, ctx_rows, fixed[c_idx].to(ctx.dtype))
    return out + pos[pos_offset : pos_offset + L].to(ctx.dtype)
