"""Compiled backend of ``assemble``: the C++ / CUDA kernels of ``fastprompt._C``.

Importing this module registers, for ``torch.ops.fastprompt.assemble_compiled_fwd`` / ``assemble_compiled_bwd``:

* fake (meta) kernels, so the ops trace under ``torch.compile`` / ``torch.export`` without running;
* the autograd formula of ``assemble_compiled_fwd`` (gradients for ``ctx`` and ``shift`` only).

It raises ImportError when the extension is not loaded; ``fastprompt.ops.assemble.assemble`` only imports it
after checking ``extension_loaded()``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from fastprompt._extension import extension_loaded, load_error
from fastprompt.ops._dispatch import register_impl

if not extension_loaded():
    raise ImportError(f"fastprompt._C is not available: {load_error()}")

__all__ = ["assemble_compiled"]

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@register_impl("assemble", backend="compiled")
def assemble_compiled(
    ctx: torch.Tensor,
    shift: Optional[torch.Tensor],
    fixed: torch.Tensor,
    slot: torch.Tensor,
    pos: torch.Tensor,
    pos_offset: int,
    g_idx: torch.Tensor,
    c_idx: torch.Tensor,
) -> torch.Tensor:
    """Packed prompt embeddings via the fused kernel (same contract as ``assemble_reference``).

    ``out[n, t] = (ctx[g, slot[c, t]] + shift[g] if slot[c, t] >= 0 else fixed[c, t]) + pos[pos_offset + t]``
    with ``g = g_idx[n]``, ``c = c_idx[n]``.

    Args:
        ctx:   [G, M, D] float64 / float32 / float16 / bfloat16, learnable context vectors.
        shift: [G, D] (ctx's dtype) or None, per-group offset added to every context token.
        fixed: [C, L, D] frozen token embeddings (cast to ctx's dtype).
        slot:  [C, L] int64, context index in [0, M) or negative for a fixed token.
        pos:   [P_total, D] positional embedding (cast to ctx's dtype), rows pos_offset .. pos_offset+L-1 used.
        pos_offset: int, with 0 <= pos_offset and pos_offset + L <= P_total.
        g_idx: [N] int64 in [0, G).
        c_idx: [N] int64 in [0, C).

    Returns:
        [N, L, D] in ctx's dtype, differentiable w.r.t. ``ctx`` and ``shift``. All inputs must be on one device
        (CPU, or CUDA when the extension was built with CUDA). Index ranges are checked with a clear error on
        CPU; on CUDA an out-of-range index trips a device-side assert (checking would need a host sync).
    """
    return torch.ops.fastprompt.assemble_compiled_fwd(ctx, shift, fixed, slot, pos, int(pos_offset), g_idx, c_idx)


# ---------------------------------------------------------------------------------------------- fake kernels
@torch.library.register_fake("fastprompt::assemble_compiled_fwd")
def _assemble_compiled_fwd_fake(ctx, shift, fixed, slot, pos, pos_offset, g_idx, c_idx):
    torch._check(ctx.dim() == 3, lambda: f"assemble: ctx must be [G, M, D], got {tuple(ctx.shape)}")
    torch._check(ctx.dtype in _FLOAT_DTYPES, lambda: f"assemble: unsupported ctx dtype {ctx.dtype}")
    G, _, D = ctx.shape
    if shift is not None:
        torch._check(
            shift.dim() == 2 and shift.shape[0] == G and shift.shape[1] == D,
            lambda: f"assemble: shift must be [G, D] = [{G}, {D}], got {tuple(shift.shape)}",
        )
        torch._check(shift.dtype == ctx.dtype, lambda: f"assemble: shift dtype {shift.dtype} != ctx dtype {ctx.dtype}")
    torch._check(
        fixed.dim() == 3 and fixed.shape[2] == D,
        lambda: f"assemble: fixed must be [C, L, D] with D = {D}, got {tuple(fixed.shape)}",
    )
    torch._check(slot.dtype == torch.int64, lambda: f"assemble: slot must be int64, got {slot.dtype}")
    torch._check(
        slot.dim() == 2 and slot.shape[0] == fixed.shape[0] and slot.shape[1] == fixed.shape[1],
        lambda: f"assemble: slot must be [C, L] = {tuple(fixed.shape[:2])}, got {tuple(slot.shape)}",
    )
    L = slot.shape[1]
    torch._check(
        pos.dim() == 2 and pos.shape[1] == D, lambda: f"assemble: pos must be [P_total, {D}], got {tuple(pos.shape)}"
    )
    torch._check(
        pos_offset >= 0 and pos_offset + L <= pos.shape[0],
        lambda: f"assemble: pos_offset + L = {pos_offset} + {L} must lie in [0, P_total = {pos.shape[0]}]",
    )
    for name, idx in (("g_idx", g_idx), ("c_idx", c_idx)):
        torch._check(idx.dtype == torch.int64 and idx.dim() == 1, lambda: f"assemble: {name} must be int64 [N]")
    torch._check(g_idx.shape[0] == c_idx.shape[0], lambda: "assemble: g_idx and c_idx must have the same length")
    return ctx.new_empty((g_idx.shape[0], L, D))


@torch.library.register_fake("fastprompt::assemble_compiled_bwd")
def _assemble_compiled_bwd_fake(grad_out, slot, g_idx, c_idx, G, M, has_shift):
    torch._check(grad_out.dim() == 3, lambda: f"assemble_compiled_bwd: grad_out must be [N, L, D], got {tuple(grad_out.shape)}")
    N, L, D = grad_out.shape
    torch._check(slot.dim() == 2 and slot.shape[1] == L, lambda: "assemble_compiled_bwd: slot must be [C, L]")
    torch._check(g_idx.shape[0] == N and c_idx.shape[0] == N, lambda: "assemble_compiled_bwd: g_idx, c_idx must be [N]")
    grad_ctx = grad_out.new_empty((G, M, D))
    grad_shift = grad_out.new_empty((G, D)) if has_shift else grad_out.new_empty((0,))
    return grad_ctx, grad_shift


# ---------------------------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output) -> None:
    # torch passes the autograd context as the keyword ``ctx``; the op's own ctx input is ``ctx_in`` here.
    ctx_in, shift, _fixed, slot, _pos, _pos_offset, g_idx, c_idx = inputs
    ctx.save_for_backward(slot, g_idx, c_idx)
    ctx.G, ctx.M = ctx_in.shape[0], ctx_in.shape[1]
    ctx.has_shift = shift is not None


def _backward(ctx, grad_out) -> Tuple[Optional[torch.Tensor], ...]:
    slot, g_idx, c_idx = ctx.saved_tensors
    need_ctx, need_shift = ctx.needs_input_grad[0], ctx.has_shift and ctx.needs_input_grad[1]
    grad_ctx = grad_shift = None
    if need_ctx or need_shift:
        grad_ctx, grad_shift = torch.ops.fastprompt.assemble_compiled_bwd(
            grad_out, slot, g_idx, c_idx, ctx.G, ctx.M, need_shift
        )
    return (
        grad_ctx if need_ctx else None,
        grad_shift if need_shift else None,
        None,  # fixed
        None,  # slot
        None,  # pos
        None,  # pos_offset
        None,  # g_idx
        None,  # c_idx
    )


torch.library.register_autograd("fastprompt::assemble_compiled_fwd", _backward, setup_context=_setup_context)
