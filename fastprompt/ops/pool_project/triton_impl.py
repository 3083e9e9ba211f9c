"""Triton backend of ``pool_project``: row kernels for gather + LayerNorm and for the L2 normalisation (and their
backward), with the GEMMs done by torch (``mm`` is already optimal there).

Kernels (one program per row, the whole row in one block of ``next_power_of_2(W)`` lanes, math in float32):

* ``_ln_fwd_kernel``: y[n] = LayerNorm(x[rows[n]]) in x's dtype, with mean[n], rstd[n];
* ``_normalize_fwd_kernel``: h[n] /= max(||h[n]||, 1e-12) in place, with norm[n];
* ``_normalize_bwd_kernel``: g_h[n] = (g[n] - out[n] <g[n], out[n]>) / norm[n] (g[n] / 1e-12 where clamped);
* ``_ln_bwd_scatter_kernel``: one program per row t of x sums, in increasing n, the LayerNorm backward of every
  gathered row n with rows[n] == t (CSR from a stable sort of rows): no atomics, deterministic, rows never
  gathered get zeros.

Intermediates (y, h, g_h, g_y) are in x's dtype, as the reference rounds them, so the GEMMs run at the input
precision (float64 inputs are computed in float32 here: use the compiled backend for exact float64).

The launches are wrapped in ``torch.library.custom_op`` (``fastprompt::pool_project_triton_fwd`` /
``_backward``) with fake kernels and the autograd formula (gradient w.r.t. x only). Triton runs on CUDA, or on
the CPU under ``TRITON_INTERPRET=1`` (set before this module is imported).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastprompt.ops.pool_project._autograd import make_backward, setup_context
from fastprompt.ops._dispatch import register_impl

__all__ = ["pool_project_triton"]

NORM_EPS = 1e-12  # F.normalize's eps


def _num_warps(block: int) -> int:
    return max(1, min(8, block // 256))


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _ln_fwd_kernel(
    x_ptr, rows_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, W, eps,
    HAS_ROWS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_W: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    if HAS_ROWS:
        r = tl.load(rows_ptr + n).to(tl.int64)
    else:
        r = n
    cols = tl.arange(0, BLOCK_W)
    mask = cols < W
    v = tl.load(x_ptr + r * W + cols, mask=mask, other=0.0).to(tl.float32)
    mu = tl.sum(v, axis=0) / W
    d = tl.where(mask, v - mu, 0.0)
    var = tl.sum(d * d, axis=0) / W
    rs = 1.0 / tl.sqrt(var + eps)
    y = d * rs
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + n * W + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + n, mu.to(mean_ptr.dtype.element_ty))
    tl.store(rstd_ptr + n, rs.to(rstd_ptr.dtype.element_ty))


@triton.jit
def _normalize_fwd_kernel(h_ptr, norm_ptr, E, BLOCK_E: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    mask = cols < E
    h = tl.load(h_ptr + n * E + cols, mask=mask, other=0.0).to(tl.float32)
    nrm = tl.sqrt(tl.sum(h * h, axis=0))
    out = h / tl.maximum(nrm, 1e-12)
    tl.store(h_ptr + n * E + cols, out.to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(norm_ptr + n, nrm.to(norm_ptr.dtype.element_ty))


@triton.jit
def _normalize_bwd_kernel(g_ptr, out_ptr, norm_ptr, gh_ptr, E, BLOCK_E: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    mask = cols < E
    g = tl.load(g_ptr + n * E + cols, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(out_ptr + n * E + cols, mask=mask, other=0.0).to(tl.float32)
    nrm = tl.load(norm_ptr + n).to(tl.float32)
    dot = tl.sum(g * o, axis=0)
    clamped = nrm < 1e-12
    denom = tl.maximum(nrm, 1e-12)
    gh = tl.where(clamped, g, g - o * dot) / denom
    tl.store(gh_ptr + n * E + cols, gh.to(gh_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ln_bwd_scatter_kernel(
    x_ptr, gy_ptr, w_ptr, mean_ptr, rstd_ptr, order_ptr, off_ptr, gx_ptr, W,
    HAS_ROWS: tl.constexpr, HAS_W: tl.constexpr, BLOCK_W: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    if HAS_ROWS:
        j0 = tl.load(off_ptr + t)
        j1 = tl.load(off_ptr + t + 1)
    else:
        j0 = t
        j1 = t + 1
    cols = tl.arange(0, BLOCK_W)
    mask = cols < W
    xv = tl.load(x_ptr + t * W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_W], dtype=tl.float32)
    for j in range(j0, j1):
        if HAS_ROWS:
            n = tl.load(order_ptr + j).to(tl.int64)
        else:
            n = j
        mu = tl.load(mean_ptr + n).to(tl.float32)
        rs = tl.load(rstd_ptr + n).to(tl.float32)
        xh = tl.where(mask, (xv - mu) * rs, 0.0)
        gxh = tl.load(gy_ptr + n * W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            gxh = gxh * w
        a = tl.sum(gxh, axis=0) / W
        b = tl.sum(gxh * xh, axis=0) / W
        acc += rs * (gxh - a - xh * b)
    tl.store(gx_ptr + t * W + cols, acc.to(gx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- launches
def _check(x, rows, ln_weight, ln_bias, eps, proj) -> None:
    if x.dim() != 2:
        raise ValueError(f"pool_project: x must be [T, W], got {tuple(x.shape)}")
    if x.dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"pool_project: x must be float64, float32, float16 or bfloat16, got {x.dtype}")
    W = x.shape[1]
    if W == 0:
        raise ValueError("pool_project: x must have at least one feature (W > 0)")
    if not (eps >= 0 and eps < float("inf")):
        raise ValueError(f"pool_project: eps must be finite and >= 0, got {eps}")
    if rows is not None:
        if rows.dtype != torch.int64 or rows.dim() != 1:
            raise ValueError(f"pool_project: rows must be an int64 [N] tensor, got {rows.dtype} {tuple(rows.shape)}")
    for name, p in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if p is not None and (p.dim() != 1 or p.shape[0] != W):
            raise ValueError(f"pool_project: {name} must be [W] = [{W}], got {tuple(p.shape)}")
    if proj is not None and (proj.dim() != 2 or proj.shape[0] != W):
        raise ValueError(f"pool_project: proj must be [W, E] with W = {W}, got {tuple(proj.shape)}")
    for name, t in (("rows", rows), ("ln_weight", ln_weight), ("ln_bias", ln_bias), ("proj", proj)):
        if t is not None and t.device != x.device:
            raise ValueError(f"pool_project: {name} is on {t.device} but x is on {x.device}; all inputs must be on the same device")


@torch.library.custom_op("fastprompt::pool_project_triton_fwd", mutates_args=())
def _forward_op(
    x: torch.Tensor,
    rows: Optional[torch.Tensor],
    ln_weight: Optional[torch.Tensor],
    ln_bias: Optional[torch.Tensor],
    eps: float,
    proj: Optional[torch.Tensor],
    normalize: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [N, E], mean [N], rstd [N], norm [N] or [0]); statistics in float32 (float64 for float64 x)."""
    _check(x, rows, ln_weight, ln_bias, eps, proj)
    T, W = x.shape
    N = T if rows is None else rows.shape[0]
    if rows is not None and N > 0 and not x.is_cuda:  # on CUDA a host-side check would need a sync
        lo, hi = int(rows.min()), int(rows.max())
        if lo < 0 or hi >= T:
            raise ValueError(f"pool_project: rows must lie in [0, T = {T}), got values in [{lo}, {hi}]")
    sdt = _stats_dtype(x.dtype)
    x_c = x.contiguous()
    rows_c = rows.contiguous() if rows is not None else None
    w_c = ln_weight.contiguous() if ln_weight is not None else None
    b_c = ln_bias.contiguous() if ln_bias is not None else None
    y = torch.empty((N, W), dtype=x.dtype, device=x.device)
    mean = torch.empty((N,), dtype=sdt, device=x.device)
    rstd = torch.empty((N,), dtype=sdt, device=x.device)
    if N > 0:
        block = triton.next_power_of_2(W)
        _ln_fwd_kernel[(N,)](
            x_c, rows_c if rows_c is not None else x_c, w_c if w_c is not None else x_c,
            b_c if b_c is not None else x_c, y, mean, rstd, W, float(eps),
            HAS_ROWS=rows_c is not None, HAS_W=w_c is not None, HAS_B=b_c is not None,
            BLOCK_W=block, num_warps=_num_warps(block),
        )
    h = y @ proj.to(x.dtype) if proj is not None else y  # as the reference: proj.to(h.dtype)
    E = h.shape[1]
    norm = torch.empty((N if normalize else 0,), dtype=sdt, device=x.device)
    if normalize and N > 0:
        if E > 0:
            block = triton.next_power_of_2(E)
            _normalize_fwd_kernel[(N,)](h, norm, E, BLOCK_E=block, num_warps=_num_warps(block))
        else:
            norm.zero_()
    return h, mean, rstd, norm


@_forward_op.register_fake
def _forward_fake(x, rows, ln_weight, ln_bias, eps, proj, normalize):
    N = x.shape[0] if rows is None else rows.shape[0]
    E = x.shape[1] if proj is None else proj.shape[1]
    sdt = _stats_dtype(x.dtype)
    return (
        x.new_empty((N, E)),
        x.new_empty((N,), dtype=sdt),
        x.new_empty((N,), dtype=sdt),
        x.new_empty((N if normalize else 0,), dtype=sdt),
    )


@torch.library.custom_op("fastprompt::pool_project_triton_bwd", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    x: torch.Tensor,
    rows: Optional[torch.Tensor],
    ln_weight: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    norm: torch.Tensor,
    proj: Optional[torch.Tensor],
    normalize: bool,
) -> torch.Tensor:
    """grad_x [T, W]: zero on rows never gathered, summed over repeated rows."""
    T, W = x.shape
    N, E = grad_out.shape
    if grad_out.dtype != x.dtype:
        grad_out = grad_out.to(x.dtype)
    g = grad_out.contiguous()
    if normalize and N > 0 and E > 0:
        gh = torch.empty((N, E), dtype=x.dtype, device=x.device)
        block = triton.next_power_of_2(E)
        _normalize_bwd_kernel[(N,)](
            g, out.contiguous(), norm.contiguous(), gh, E, BLOCK_E=block, num_warps=_num_warps(block)
        )
    else:
        gh = g
    gy = (gh @ proj.to(x.dtype).t()).contiguous() if proj is not None else gh
    grad_x = torch.empty((T, W), dtype=x.dtype, device=x.device)
    if T == 0:
        return grad_x
    if rows is not None:
        sorted_rows, order = torch.sort(rows, stable=True)
        offsets = torch.searchsorted(sorted_rows, torch.arange(T + 1, device=x.device, dtype=rows.dtype))
    else:
        order = offsets = None
    block = triton.next_power_of_2(W)
    x_c = x.contiguous()
    w_c = ln_weight.contiguous() if ln_weight is not None else None
    _ln_bwd_scatter_kernel[(T,)](
        x_c, gy, w_c if w_c is not None else x_c, mean.contiguous(), rstd.contiguous(),
        order if order is not None else x_c, offsets if offsets is not None else x_c, grad_x, W,
        HAS_ROWS=rows is not None, HAS_W=w_c is not None, BLOCK_W=block, num_warps=_num_warps(block),
    )
    return grad_x


@_backward_op.register_fake
def _backward_fake(grad_out, out, x, rows, ln_weight, mean, rstd, norm, proj, normalize):
    return x.new_empty(x.shape)




_forward_op.register_autograd(make_backward(_backward_op), setup_context=setup_context)


@register_impl("pool_project", backend="triton")
def pool_project_triton(
    x: torch.Tensor,
    rows: Optional[torch.Tensor],
    ln_weight: Optional[torch.Tensor],
    ln_bias: Optional[torch.Tensor],
    eps: float,
    proj: Optional[torch.Tensor],
    normalize: bool,
) -> torch.Tensor:
    """Pooled, projected text features via the Triton kernels (same contract as ``pool_project_reference``).

    Shapes: x [T, W], rows [N] int64 or None (N = T), ln_weight / ln_bias [W] or None, proj [W, E] or None
    (E = W)  ->  [N, E] in x's dtype, differentiable w.r.t. x only.
    """
    return _forward_op(x, rows, ln_weight, ln_bias, float(eps), proj, bool(normalize))[0]
