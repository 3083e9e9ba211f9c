"""Triton backend of ``assemble``: packed prompt embeddings (same contract as ``assemble_reference``).

Importing this module registers two ``torch.library`` custom ops (opaque to ``torch.compile``, checked by
``torch.library.opcheck``), their fake kernels, and the autograd formula of the forward:

* ``fastprompt::assemble_triton_fwd(ctx, shift?, fixed, slot, pos, pos_offset, g_idx, c_idx) -> out [N, L, D]``
* ``fastprompt::assemble_triton_bwd(grad_out, slot, g_idx, c_idx, G, M, has_shift)
  -> (grad_ctx [G, M, D], grad_shift [G, D] or [0])``

Kernels (arithmetic in float32, float64 for float64 inputs; outputs in ctx's dtype):

* forward, one program per (pair, block of BLOCK_T positions), looping over D in BLOCK_D columns. Each position
  loads either its context row (+ shift) or its fixed row (masked loads: only one of the two is fetched) and
  adds the positional row. ``fixed`` / ``pos`` / ``shift`` are first rounded to ctx's dtype, as the reference
  casts them (``.to(ctx.dtype)``), then upcast, so mixed-dtype inputs round exactly where the reference does.
* backward, a **deterministic two-pass reduction** (no atomics): pairs are stably sorted by group; each group's
  pairs are cut into chunks of at most ``PAIRS_PER_CHUNK`` pairs. Pass 1, one program per (chunk, context slot
  k, D block), sums the upstream rows of the chunk whose slot is k (a masked load, so every context row of
  ``grad_out`` is read once in all and fixed rows never) into a float32 partial [chunk, k, D]. Pass 2, one
  program per (group, D block), adds the group's partials in chunk order, writes grad_ctx[g, k] and, because
  every context position feeds exactly one slot, ``grad_shift[g] = sum_k grad_ctx[g, k]`` (in float32, before
  rounding). Results are bitwise reproducible run to run; CoOp's hot spot (G = 1, every pair adds into the
  same M rows) has no atomic contention and still spreads over N / PAIRS_PER_CHUNK programs.

Requirements: ctx float64 / float32 / float16 / bfloat16; shift, fixed, pos any float dtype (cast to ctx's);
slot / g_idx / c_idx int64; any strides. Index ranges are checked on the CPU (the interpreter); on CUDA an
out-of-range index reads out of bounds, as a check would need a host sync.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastprompt.ops._dispatch import register_impl

__all__ = ["assemble_triton"]

_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tuning knobs, module level so tests can force the multi-chunk paths.
PAIRS_PER_CHUNK: Optional[int] = None  # None: 16 on a GPU (parallelism for G = 1), 64 under the interpreter
_TILE = 2048  # elements of a [BLOCK_T, BLOCK_D] tile


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every float buffer the kernels fully overwrite is allocated here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _pairs_per_chunk() -> int:
    if PAIRS_PER_CHUNK is not None:
        return max(1, int(PAIRS_PER_CHUNK))
    return 64 if _INTERPRET else 16


def _blocks(L: int, D: int, max_block_d: int) -> Tuple[int, int]:
    block_d = min(triton.next_power_of_2(max(D, 1)), max_block_d)
    block_t = min(triton.next_power_of_2(max(L, 1)), max(1, _TILE // block_d))
    return block_t, block_d


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _fwd_kernel(
    OUT, CTX, SHIFT, FIXED, SLOT, POS, GIDX, CIDX,
    L, D, pos_offset,
    s_cg, s_cm, s_cd, s_sg, s_sd, s_fc, s_ft, s_fd, s_sc, s_st, s_pp, s_pd, s_g, s_c,
    HAS_SHIFT: tl.constexpr, ACC64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if ACC64 else tl.float32
    OUT_T: tl.constexpr = OUT.dtype.element_ty
    n = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < L
    g = tl.load(GIDX + n * s_g)
    c = tl.load(CIDX + n * s_c)
    s = tl.load(SLOT + c * s_sc + t * s_st, mask=t_ok, other=-1)
    is_ctx = s >= 0
    is_fix = s < 0
    s_safe = tl.where(is_ctx, s, 0)
    out_row = OUT + n * L * D + t[:, None].to(tl.int64) * D
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        tile_ok = t_ok[:, None] & d_ok[None, :]
        # Exactly one of the two loads is live per position: fixed rows are never fetched for context slots and
        # vice versa (the reference computes both and selects; the selected values are the same).
        cv = tl.load(CTX + g * s_cg + s_safe[:, None] * s_cm + d[None, :] * s_cd,
                     mask=tile_ok & is_ctx[:, None], other=0.0).to(ACC)
        if HAS_SHIFT:
            # round to ctx's dtype first (the reference's .to(ctx.dtype)), then compute in ACC
            sh = tl.load(SHIFT + g * s_sg + d * s_sd, mask=d_ok, other=0.0).to(OUT_T).to(ACC)
            cv = cv + sh[None, :]
        fv = tl.load(FIXED + c * s_fc + t[:, None] * s_ft + d[None, :] * s_fd,
                     mask=tile_ok & is_fix[:, None], other=0.0).to(OUT_T).to(ACC)
        pv = tl.load(POS + (pos_offset + t[:, None]) * s_pp + d[None, :] * s_pd,
                     mask=tile_ok, other=0.0).to(OUT_T).to(ACC)
        val = tl.where(is_ctx[:, None], cv, fv) + pv
        tl.store(out_row + d[None, :], val.to(OUT_T), mask=tile_ok)


@triton.jit
def _bwd_partial_kernel(
    PART, GRAD, SLOT, ORDER, CIDX, LO, HI,
    L, M, D,
    s_gn, s_gt, s_gd, s_sc, s_st, s_c,
    ACC64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if ACC64 else tl.float32
    j = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    lo = tl.load(LO + j)
    hi = tl.load(HI + j)
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    for p in range(lo, hi):  # the chunk's pairs, in sorted (= original within a group) order
        n = tl.load(ORDER + p)
        c = tl.load(CIDX + n * s_c)
        for t0 in range(0, L, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            s = tl.load(SLOT + c * s_sc + t * s_st, mask=t < L, other=-1)
            hit = s == k  # masked load: only the rows of slot k are read (each context row once over all k)
            gv = tl.load(GRAD + n * s_gn + t[:, None] * s_gt + d[None, :] * s_gd,
                         mask=hit[:, None] & d_ok[None, :], other=0.0).to(ACC)
            acc += tl.sum(gv, axis=0)
    # Every chunk index j < the launch bound writes its partial (empty chunks write zeros), so pass 2 never
    # reads an unwritten element.
    tl.store(PART + (j * M + k) * D + d, acc, mask=d_ok)


@triton.jit
def _bwd_reduce_kernel(
    GCTX, GSHIFT, PART, GCHUNK,
    M, D,
    HAS_SHIFT: tl.constexpr, ACC64: tl.constexpr, BLOCK_D: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if ACC64 else tl.float32
    OUT_T: tl.constexpr = GCTX.dtype.element_ty
    g = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    j0 = tl.load(GCHUNK + g)
    j1 = tl.load(GCHUNK + g + 1)
    sh = tl.zeros([BLOCK_D], dtype=ACC)
    for k in range(0, M):
        acc = tl.zeros([BLOCK_D], dtype=ACC)
        for j in range(j0, j1):  # fixed chunk order: deterministic
            acc += tl.load(PART + (j * M + k) * D + d, mask=d_ok, other=0.0)
        tl.store(GCTX + (g * M + k) * D + d, acc.to(OUT_T), mask=d_ok)
        sh += acc  # shift's gradient from the unrounded slot sums: one rounding, not M + 1
    if HAS_SHIFT:
        tl.store(GSHIFT + g * D + d, sh.to(OUT_T), mask=d_ok)


# ---------------------------------------------------------------------------------------------- checks
def _check_inputs(ctx, shift, fixed, slot, pos, pos_offset, g_idx, c_idx) -> None:
    """Shape / dtype checks shared by the fake and the real kernel (torch._check raises RuntimeError)."""
    torch._check(ctx.dim() == 3, lambda: f"assemble: ctx must be [G, M, D], got {tuple(ctx.shape)}")
    torch._check(
        ctx.dtype in _DTYPES, lambda: f"assemble: ctx must be float64, float32, float16 or bfloat16, got {ctx.dtype}"
    )
    G, _, D = ctx.shape
    if shift is not None:
        torch._check(
            shift.dim() == 2 and shift.shape[0] == G and shift.shape[1] == D,
            lambda: f"assemble: shift must be [G, D] = [{G}, {D}], got {tuple(shift.shape)}",
        )
        torch._check(shift.is_floating_point(), lambda: f"assemble: shift must be floating point, got {shift.dtype}")
    torch._check(
        fixed.dim() == 3 and fixed.shape[2] == D,
        lambda: f"assemble: fixed must be [C, L, D] with D = {D}, got {tuple(fixed.shape)}",
    )
    torch._check(fixed.is_floating_point(), lambda: f"assemble: fixed must be floating point, got {fixed.dtype}")
    torch._check(slot.dtype == torch.int64, lambda: f"assemble: slot must be int64, got {slot.dtype}")
    torch._check(
        slot.dim() == 2 and slot.shape[0] == fixed.shape[0] and slot.shape[1] == fixed.shape[1],
        lambda: f"assemble: slot must be [C, L] = {tuple(fixed.shape[:2])}, got {tuple(slot.shape)}",
    )
    L = slot.shape[1]
    torch._check(
        pos.dim() == 2 and pos.shape[1] == D, lambda: f"assemble: pos must be [P_total, {D}], got {tuple(pos.shape)}"
    )
    torch._check(pos.is_floating_point(), lambda: f"assemble: pos must be floating point, got {pos.dtype}")
    torch._check(
        pos_offset >= 0 and pos_offset + L <= pos.shape[0],
        lambda: f"assemble: pos_offset + L = {pos_offset} + {L} must lie in [0, P_total = {pos.shape[0]}]",
    )
    for name, idx in (("g_idx", g_idx), ("c_idx", c_idx)):
        torch._check(idx.dtype == torch.int64 and idx.dim() == 1, lambda: f"assemble: {name} must be int64 [N]")
    torch._check(g_idx.shape[0] == c_idx.shape[0], lambda: "assemble: g_idx and c_idx must have the same length N")


def _check_devices(*tensors) -> None:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise RuntimeError(f"assemble: all tensors must be on the same device, got {sorted(map(str, devices))}")


def _check_ranges(ctx, slot, fixed, g_idx, c_idx) -> None:
    """Index ranges; only where it costs no device sync (CPU tensors, i.e. the interpreter)."""
    if ctx.device.type != "cpu":
        return
    G, M = ctx.shape[0], ctx.shape[1]
    C = fixed.shape[0]
    for name, idx, hi in (("g_idx", g_idx, G), ("c_idx", c_idx, C)):
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= hi):
            bad = int(idx.min()) if int(idx.min()) < 0 else int(idx.max())
            raise RuntimeError(f"assemble: {name} has value {bad} outside [0, {hi})")
    if slot.numel() and int(slot.max()) >= M:
        raise RuntimeError(f"assemble: slot has value {int(slot.max())} but context slots must be < M = {M}")


# ---------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("fastprompt::assemble_triton_fwd", mutates_args=())
def _assemble_fwd(
    ctx: torch.Tensor,
    shift: Optional[torch.Tensor],
    fixed: torch.Tensor,
    slot: torch.Tensor,
    pos: torch.Tensor,
    pos_offset: int,
    g_idx: torch.Tensor,
    c_idx: torch.Tensor,
) -> torch.Tensor:
    _check_inputs(ctx, shift, fixed, slot, pos, pos_offset, g_idx, c_idx)
    _check_devices(ctx, shift, fixed, slot, pos, g_idx, c_idx)
    _check_ranges(ctx, slot, fixed, g_idx, c_idx)
    N, (C, L), D = g_idx.shape[0], slot.shape, ctx.shape[2]
    out = _empty((N, L, D), ctx.dtype, ctx.device)
    if out.numel() == 0:
        return out
    block_t, block_d = _blocks(L, D, 256)
    sh = shift if shift is not None else ctx  # dummy pointer, never read (HAS_SHIFT=False)
    s_sg, s_sd = (shift.stride(0), shift.stride(1)) if shift is not None else (0, 0)
    _fwd_kernel[(N, triton.cdiv(L, block_t))](
        out, ctx, sh, fixed, slot, pos, g_idx, c_idx,
        L, D, pos_offset,
        ctx.stride(0), ctx.stride(1), ctx.stride(2), s_sg, s_sd,
        fixed.stride(0), fixed.stride(1), fixed.stride(2), slot.stride(0), slot.stride(1),
        pos.stride(0), pos.stride(1), g_idx.stride(0), c_idx.stride(0),
        HAS_SHIFT=shift is not None, ACC64=ctx.dtype == torch.float64, BLOCK_T=block_t, BLOCK_D=block_d,
        num_warps=4,
    )
    return out


@_assemble_fwd.register_fake
def _assemble_fwd_fake(ctx, shift, fixed, slot, pos, pos_offset, g_idx, c_idx):
    _check_inputs(ctx, shift, fixed, slot, pos, pos_offset, g_idx, c_idx)
    return ctx.new_empty((g_idx.shape[0], slot.shape[1], ctx.shape[2]))


def _check_bwd(grad_out, slot, g_idx, c_idx, G, M) -> None:
    torch._check(
        grad_out.dim() == 3, lambda: f"assemble_backward: grad_out must be [N, L, D], got {tuple(grad_out.shape)}"
    )
    torch._check(grad_out.dtype in _DTYPES, lambda: f"assemble_backward: unsupported grad_out dtype {grad_out.dtype}")
    N, L, _ = grad_out.shape
    torch._check(slot.dim() == 2 and slot.shape[1] == L, lambda: "assemble_backward: slot must be [C, L]")
    torch._check(slot.dtype == torch.int64, lambda: "assemble_backward: slot must be int64")
    torch._check(
        g_idx.dim() == 1 and c_idx.dim() == 1 and g_idx.shape[0] == N and c_idx.shape[0] == N,
        lambda: "assemble_backward: g_idx, c_idx must be [N]",
    )
    torch._check(G >= 1 and M >= 1, lambda: f"assemble_backward: G = {G} and M = {M} must be >= 1")


@torch.library.custom_op("fastprompt::assemble_triton_bwd", mutates_args=())
def _assemble_bwd(
    grad_out: torch.Tensor,
    slot: torch.Tensor,
    g_idx: torch.Tensor,
    c_idx: torch.Tensor,
    G: int,
    M: int,
    has_shift: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    _check_bwd(grad_out, slot, g_idx, c_idx, G, M)
    _check_devices(grad_out, slot, g_idx, c_idx)
    N, L, D = grad_out.shape
    dev, dtype = grad_out.device, grad_out.dtype
    grad_ctx = _empty((G, M, D), dtype, dev)
    grad_shift = _empty((G, D) if has_shift else (0,), dtype, dev)
    if D == 0:
        return grad_ctx, grad_shift
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    chunk = _pairs_per_chunk()

    # Chunk table, built on the device without a host sync: the launch bound J >= the real number of chunks,
    # since sum_g ceil(n_g / chunk) <= ceil(N / chunk) + (#non-empty groups).
    order = torch.argsort(g_idx, stable=True)
    groups = torch.arange(G, device=dev)
    sorted_g = g_idx[order].contiguous()
    pair_lo = torch.searchsorted(sorted_g, groups)  # [G] first sorted pair of each group
    pair_hi = torch.searchsorted(sorted_g, groups, right=True)
    n_chunks = (pair_hi - pair_lo + chunk - 1) // chunk
    chunk_hi = n_chunks.cumsum(0)
    gchunk = torch.cat([chunk_hi.new_zeros(1), chunk_hi])  # [G + 1] chunk range of each group
    J = max(1, triton.cdiv(N, chunk) + min(G, N))
    j = torch.arange(J, device=dev)
    g_of_j = torch.searchsorted(chunk_hi, j, right=True).clamp_(max=G - 1)
    lo = pair_lo[g_of_j] + (j - gchunk[g_of_j]) * chunk
    hi = torch.minimum(lo + chunk, pair_hi[g_of_j])
    live = j < chunk_hi[-1]
    lo = torch.where(live, lo, 0).contiguous()
    hi = torch.where(live, hi, 0).contiguous()

    part = _empty((J, M, D), acc_dtype, dev)
    block_t, block_d = _blocks(L, D, 128)
    _bwd_partial_kernel[(J, M, triton.cdiv(D, block_d))](
        part, grad_out, slot, order, c_idx, lo, hi,
        L, M, D,
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), slot.stride(0), slot.stride(1), c_idx.stride(0),
        ACC64=acc_dtype == torch.float64, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
    )
    block_r = min(triton.next_power_of_2(D), 1024)
    _bwd_reduce_kernel[(G, triton.cdiv(D, block_r))](
        grad_ctx, grad_shift if has_shift else grad_ctx, part, gchunk.contiguous(),
        M, D,
        HAS_SHIFT=has_shift, ACC64=acc_dtype == torch.float64, BLOCK_D=block_r, num_warps=4,
    )
    return grad_ctx, grad_shift


@_assemble_bwd.register_fake
def _assemble_bwd_fake(grad_out, slot, g_idx, c_idx, G, M, has_shift):
    _check_bwd(grad_out, slot, g_idx, c_idx, G, M)
    D = grad_out.shape[2]
    return grad_out.new_empty((G, M, D)), grad_out.new_empty((G, D) if has_shift else (0,))


def _setup_context(ctx, inputs, output) -> None:
    # torch passes the autograd context as ``ctx``; the op's own ctx input is ``ctx_in`` here.
    ctx_in, shift, _fixed, slot, _pos, _pos_offset, g_idx, c_idx = inputs
    ctx.save_for_backward(slot, g_idx, c_idx)
    ctx.G, ctx.M = ctx_in.shape[0], ctx_in.shape[1]
    ctx.has_shift = shift is not None
    ctx.ctx_dtype = ctx_in.dtype
    ctx.shift_dtype = shift.dtype if shift is not None else None


def _backward(ctx, grad_out):
    slot, g_idx, c_idx = ctx.saved_tensors
    need_ctx, need_shift = ctx.needs_input_grad[0], ctx.has_shift and ctx.needs_input_grad[1]
    grad_ctx = grad_shift = None
    if need_ctx or need_shift:
        grad_ctx, grad_shift = torch.ops.fastprompt.assemble_triton_bwd(
            grad_out.to(ctx.ctx_dtype), slot, g_idx, c_idx, ctx.G, ctx.M, need_shift
        )
        if need_shift and ctx.shift_dtype != ctx.ctx_dtype:
            grad_shift = grad_shift.to(ctx.shift_dtype)  # the reference's .to(ctx.dtype) transposes to this cast
    return (
        grad_ctx if need_ctx else None,
        grad_shift if need_shift else None,
        None, None, None, None, None, None,  # fixed, slot, pos, pos_offset, g_idx, c_idx
    )


torch.library.register_autograd("fastprompt::assemble_triton_fwd", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------- public
@register_impl("assemble", backend="triton")
def assemble_triton(
    ctx: torch.Tensor,
    shift: Optional[torch.Tensor],
    fixed: torch.Tensor,
    slot: torch.Tensor,
    pos: torch.Tensor,
    pos_offset: int,
    g_idx: torch.Tensor,
    c_idx: torch.Tensor,
) -> torch.Tensor:
    """Packed prompt embeddings via the Triton kernels (same contract as ``assemble_reference``).

    ``out[n, t] = (ctx[g, slot[c, t]] + shift[g] if slot[c, t] >= 0 else fixed[c, t]) + pos[pos_offset + t]``
    with ``g = g_idx[n]``, ``c = c_idx[n]``. Shapes: ctx [G, M, D], shift [G, D] | None, fixed [C, L, D],
    slot [C, L] int64, pos [P_total, D], g_idx / c_idx [N] int64 -> [N, L, D] in ctx's dtype, differentiable
    w.r.t. ``ctx`` and ``shift`` (deterministic backward). Runs on CUDA, or on the CPU under TRITON_INTERPRET=1.
    """
    return torch.ops.fastprompt.assemble_triton_fwd(ctx, shift, fixed, slot, pos, int(pos_offset), g_idx, c_idx)
