"""Triton backend of ``vapt_prompts``: VAPT's per-layer prompt generator in one forward and one backward launch.

Same contract as :func:`fastprompt.ops.vapt_prompts.reference.vapt_prompts_reference`. Importing this module
registers two ``torch.library`` custom ops (opaque to ``torch.compile``, checked by ``torch.library.opcheck``),
their fake kernels, and the autograd formula of the forward:

* ``fastprompt::vapt_prompts_triton_fwd(x, ln_weight, ln_bias, eps, kernel, tok_weight, tok_bias, w1, w2, H, W,
  chan_mask?, hidden_mask?, scale) -> (out [B, N, D], t [B, N, D], hidden [B, N, Dh], mean [B, P], rstd [B, P])``
* ``fastprompt::vapt_prompts_triton_bwd(grad_out, x, ln_weight, ln_bias, kernel, tok_weight, w1, w2, H, W, chan_mask?,
  hidden_mask?, scale, t, hidden, mean, rstd) -> (grad_x, grad_ln_weight, grad_ln_bias, grad_kernel,
  grad_tok_weight, grad_tok_bias, grad_w1, grad_w2)``

The numerics. The shared K x K channel convolution followed by the token projector is one linear map over the
patches, ``t[n, c] = sum_p A[n, p] * y[p, c]`` with ``A[n, p] = sum_{a,b} k[a, b] * Wt[n, (i - a, j - b)]``
(p = (i, j); terms outside the H' x W' output grid are zero). The kernels build tiles of A on the fly from Wt and
k (K^2 masked gathers), so the [B, D, H', W'] convolution output is never materialised: the eager path's
LayerNorm, permute, conv, dropout, token linear, 3-op MLP and residual (~10 launches forward, ~25 backward)
become one launch each way. Dropout2d is a per-(sample, channel) factor and commutes with A.

* forward, one program per sample: (1) per-token mean and rstd (two passes over the channels, as LayerNorm
  computes them; stored for the backward), (2) per channel chunk, ``t = A @ LN(x)`` accumulated over patch
  blocks, channel mask, token bias; t is stored and its contribution to the hidden layer ``t @ w1.T``
  accumulated, (3) per channel chunk, ``out = t + scale * (mask * relu(h)) @ w2.T``.
* backward, one program per sample: the MLP backward (grad_h needs all channels first), ``grad_t``, then the
  LayerNorm input gradient per patch block (its two per-token reductions over all channels), and per-sample
  partial sums of every parameter gradient.

Determinism: every reduction runs inside one program in a fixed order, and the per-sample parameter-gradient
partials are summed over the batch by ``torch.sum`` (a fixed-order tree, no atomics); A's gradient is folded back
onto k and Wt with K^2 shifted slices. Arithmetic is float32 (float64 for float64 inputs; ``tl.dot`` with
``input_precision="ieee"``, never TF32), rounded once on store. One program per sample keeps every cross-channel
reduction local; at VTAB batch 64 that is 64 programs per layer.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastprompt.ops.vapt_prompts.reference import check_vapt_args
from fastprompt.ops._dispatch import register_impl

__all__ = ["vapt_prompts_triton"]

_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
BLOCK_P = 16  # patches per block (tl.dot's minimum)
MAX_BLOCK_C = 64  # channels per chunk
NUM_WARPS = 4


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer the kernels fully overwrite is allocated here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(n, 1)))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _a_tile(TW, KER, n, n_ok, p, p_ok, W, Hc, Wc, s_twn, K: tl.constexpr, ACC: tl.constexpr,
            BN: tl.constexpr, BP: tl.constexpr):
    """[BN, BP] tile of A[n, p] = sum_{a, b} k[a, b] * Wt[n, (i - a) * Wc + (j - b)] (0 outside the grid)."""
    i = p // W
    j = p % W
    a = tl.zeros([BN, BP], dtype=ACC)
    for ka in tl.static_range(K):
        for kb in tl.static_range(K):
            ii = i - ka
            jj = j - kb
            ok = p_ok & (ii >= 0) & (ii < Hc) & (jj >= 0) & (jj < Wc)
            kv = tl.load(KER + ka * K + kb).to(ACC)
            w = tl.load(TW + n[:, None] * s_twn + (ii * Wc + jj)[None, :], mask=n_ok[:, None] & ok[None, :], other=0.0)
            a += kv * w.to(ACC)
    return a


@triton.jit
def _xhat_tile(X, MU, RSTD, b, p, p_ok, c, c_ok, P, sxb, sxp, sxd, ACC: tl.constexpr):
    """([BP, BC] normalised x (0 outside), [BP] rstd) of sample b."""
    m = p_ok[:, None] & c_ok[None, :]
    xt = tl.load(X + b * sxb + p[:, None] * sxp + c[None, :] * sxd, mask=m, other=0.0).to(ACC)
    mu = tl.load(MU + b * P + p, mask=p_ok, other=0.0)
    rstd = tl.load(RSTD + b * P + p, mask=p_ok, other=0.0)
    return tl.where(m, (xt - mu[:, None]) * rstd[:, None], 0.0), rstd


@triton.jit
def _ln_tile(X, MU, RSTD, g, be, b, p, p_ok, c, c_ok, P, sxb, sxp, sxd, ACC: tl.constexpr):
    """([BP, BC] LayerNorm output y = xhat * g + be (0 outside), [BP, BC] xhat) of sample b; g, be [BC] are
    the loaded affine chunks (the caller loads them once per channel chunk)."""
    xh, _r = _xhat_tile(X, MU, RSTD, b, p, p_ok, c, c_ok, P, sxb, sxp, sxd, ACC)
    return tl.where(p_ok[:, None] & c_ok[None, :], xh * g[None, :] + be[None, :], 0.0), xh


@triton.jit
def _row_ranges(N, DH, BN: tl.constexpr, BDH: tl.constexpr):
    """(prompt rows n [BN], n < N, hidden units jh [BDH], jh < DH): the index vectors of one sample's program."""
    n = tl.arange(0, BN)
    jh = tl.arange(0, BDH)
    return n, n < N, jh, jh < DH


@triton.jit
def _fwd_kernel(
    OUT, T, HID, MU, RSTD, X, LNW, LNB, KER, TW, TB, W1, W2, CM, HM,
    P, D, N, DH, W, Hc, Wc, eps, scale,
    sxb, sxp, sxd, s_twn, s_w1j, s_w1c, s_w2c, s_w2j,
    K: tl.constexpr, HAS_CM: tl.constexpr, HAS_HM: tl.constexpr, ACC64: tl.constexpr,
    BN: tl.constexpr, BDH: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if ACC64 else tl.float32
    b = tl.program_id(0)
    n, n_ok, jh, jh_ok = _row_ranges(N, DH, BN, BDH)
    # (1) LayerNorm statistics per patch: mean, then the centred variance (two passes, as F.layer_norm)
    for p0 in range(0, P, BP):
        p = p0 + tl.arange(0, BP)
        p_ok = p < P
        s = tl.zeros([BP], dtype=ACC)
        for c0 in range(0, D, BC):
            c = c0 + tl.arange(0, BC)
            m = p_ok[:, None] & (c < D)[None, :]
            s += tl.sum(tl.load(X + b * sxb + p[:, None] * sxp + c[None, :] * sxd, mask=m, other=0.0).to(ACC), 1)
        mu = s / D
        v = tl.zeros([BP], dtype=ACC)
        for c0 in range(0, D, BC):
            c = c0 + tl.arange(0, BC)
            m = p_ok[:, None] & (c < D)[None, :]
            xt = tl.load(X + b * sxb + p[:, None] * sxp + c[None, :] * sxd, mask=m, other=0.0).to(ACC)
            d = tl.where(m, xt - mu[:, None], 0.0)
            v += tl.sum(d * d, 1)
        rstd = 1.0 / tl.sqrt(v / D + eps)
        tl.store(MU + b * P + p, mu, mask=p_ok)
        tl.store(RSTD + b * P + p, rstd, mask=p_ok)
    tl.debug_barrier()
    # (2) t = mask_c * (A @ LN(x)) + bias, and the hidden pre-activation t @ w1.T
    h = tl.zeros([BN, BDH], dtype=ACC)
    tb = tl.load(TB + n, mask=n_ok, other=0.0).to(ACC)
    for c0 in range(0, D, BC):
        c = c0 + tl.arange(0, BC)
        c_ok = c < D
        g = tl.load(LNW + c, mask=c_ok, other=0.0).to(ACC)
        be = tl.load(LNB + c, mask=c_ok, other=0.0).to(ACC)
        acc = tl.zeros([BN, BC], dtype=ACC)
        for p0 in range(0, P, BP):
            p = p0 + tl.arange(0, BP)
            p_ok = p < P
            y, _xh = _ln_tile(X, MU, RSTD, g, be, b, p, p_ok, c, c_ok, P, sxb, sxp, sxd, ACC)
            a = _a_tile(TW, KER, n, n_ok, p, p_ok, W, Hc, Wc, s_twn, K, ACC, BN, BP)
            acc = tl.dot(a, y, acc, input_precision="ieee")
        if HAS_CM:
            acc = acc * tl.load(CM + b * D + c, mask=c_ok, other=0.0).to(ACC)[None, :]
        t = tl.where(n_ok[:, None] & c_ok[None, :], acc + tb[:, None], 0.0)
        tl.store(T + b * N * D + n[:, None] * D + c[None, :], t, mask=n_ok[:, None] & c_ok[None, :])
        w1t = tl.load(W1 + jh[None, :] * s_w1j + c[:, None] * s_w1c, mask=jh_ok[None, :] & c_ok[:, None], other=0.0)
        h = tl.dot(t, w1t.to(ACC), h, input_precision="ieee")
    hm_ok = n_ok[:, None] & jh_ok[None, :]
    tl.store(HID + b * N * DH + n[:, None] * DH + jh[None, :], h, mask=hm_ok)
    hm = tl.where(h > 0, h, 0.0)
    if HAS_HM:
        hm = hm * tl.load(HM + b * N * DH + n[:, None] * DH + jh[None, :], mask=hm_ok, other=0.0).to(ACC)
    tl.debug_barrier()
    # (3) out = t + scale * hm @ w2.T
    OUT_T: tl.constexpr = OUT.dtype.element_ty
    for c0 in range(0, D, BC):
        c = c0 + tl.arange(0, BC)
        c_ok = c < D
        m = n_ok[:, None] & c_ok[None, :]
        t = tl.load(T + b * N * D + n[:, None] * D + c[None, :], mask=m, other=0.0)
        w2t = tl.load(W2 + c[None, :] * s_w2c + jh[:, None] * s_w2j, mask=c_ok[None, :] & jh_ok[:, None], other=0.0)
        o = tl.dot(hm, w2t.to(ACC), input_precision="ieee") * scale + t
        tl.store(OUT + b * N * D + n[:, None] * D + c[None, :], o.to(OUT_T), mask=m)


@triton.jit
def _bwd_kernel(
    GX, GS, GW1P, GW2P, GTBP, GAP, GLWP, GLBP,
    G, X, LNW, LNB, KER, TW, W1, W2, CM, HM, T, HID, MU, RSTD,
    P, D, N, DH, W, Hc, Wc, scale,
    sgb, sgn, sgd, sxb, sxp, sxd, s_twn, s_w1j, s_w1c, s_w2c, s_w2j,
    K: tl.constexpr, HAS_CM: tl.constexpr, HAS_HM: tl.constexpr, ACC64: tl.constexpr,
    BN: tl.constexpr, BDH: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if ACC64 else tl.float32
    b = tl.program_id(0)
    n, n_ok, jh, jh_ok = _row_ranges(N, DH, BN, BDH)
    hm_ok = n_ok[:, None] & jh_ok[None, :]
    hpre = tl.load(HID + b * N * DH + n[:, None] * DH + jh[None, :], mask=hm_ok, other=0.0)
    hm = tl.where(hpre > 0, hpre, 0.0)
    if HAS_HM:
        hmask = tl.load(HM + b * N * DH + n[:, None] * DH + jh[None, :], mask=hm_ok, other=0.0).to(ACC)
        hm = hm * hmask
    # (1) grad of the MLP's output layer: grad_w2 partial, and grad_hm = scale * g @ w2 (over every channel)
    ghm = tl.zeros([BN, BDH], dtype=ACC)
    for c0 in range(0, D, BC):
        c = c0 + tl.arange(0, BC)
        c_ok = c < D
        gt = tl.load(G + b * sgb + n[:, None] * sgn + c[None, :] * sgd, mask=n_ok[:, None] & c_ok[None, :], other=0.0)
        gt = gt.to(ACC)
        w2 = tl.load(W2 + c[:, None] * s_w2c + jh[None, :] * s_w2j, mask=c_ok[:, None] & jh_ok[None, :], other=0.0)
        ghm = tl.dot(gt, w2.to(ACC), ghm, input_precision="ieee")
        gw2 = tl.dot(tl.trans(gt), hm, input_precision="ieee") * scale
        tl.store(GW2P + b * D * DH + c[:, None] * DH + jh[None, :], gw2, mask=c_ok[:, None] & jh_ok[None, :])
    gh = tl.where(hpre > 0, ghm * scale, 0.0)
    if HAS_HM:
        gh = gh * hmask
    # (2) grad_t = g + gh @ w1 (residual + MLP input), grad_w1 / token-bias partials, grad_s = grad_t * mask_c
    gtb = tl.zeros([BN], dtype=ACC)
    for c0 in range(0, D, BC):
        c = c0 + tl.arange(0, BC)
        c_ok = c < D
        m = n_ok[:, None] & c_ok[None, :]
        gt = tl.load(G + b * sgb + n[:, None] * sgn + c[None, :] * sgd, mask=m, other=0.0).to(ACC)
        w1 = tl.load(W1 + jh[:, None] * s_w1j + c[None, :] * s_w1c, mask=jh_ok[:, None] & c_ok[None, :], other=0.0)
        gt = tl.where(m, gt + tl.dot(gh, w1.to(ACC), input_precision="ieee"), 0.0)
        t = tl.load(T + b * N * D + n[:, None] * D + c[None, :], mask=m, other=0.0)
        gw1 = tl.dot(tl.trans(gh), t, input_precision="ieee")
        tl.store(GW1P + b * DH * D + jh[:, None] * D + c[None, :], gw1, mask=jh_ok[:, None] & c_ok[None, :])
        gtb += tl.sum(gt, 1)
        if HAS_CM:
            gt = gt * tl.load(CM + b * D + c, mask=c_ok, other=0.0).to(ACC)[None, :]
        tl.store(GS + b * N * D + n[:, None] * D + c[None, :], gt, mask=m)
    tl.store(GTBP + b * N + n, gtb, mask=n_ok)
    tl.debug_barrier()
    # (3) per patch block: grad_y = A.T @ grad_s; the LayerNorm input gradient needs two reductions over all
    #     channels per patch first (r1 = sum gy*g, r2 = sum gy*g*xhat); A's gradient partial sum_c gs y^T
    for p0 in range(0, P, BP):
        p = p0 + tl.arange(0, BP)
        p_ok = p < P
        a = _a_tile(TW, KER, n, n_ok, p, p_ok, W, Hc, Wc, s_twn, K, ACC, BN, BP)
        r1 = tl.zeros([BP], dtype=ACC)
        r2 = tl.zeros([BP], dtype=ACC)
        ga = tl.zeros([BN, BP], dtype=ACC)
        for c0 in range(0, D, BC):
            c = c0 + tl.arange(0, BC)
            c_ok = c < D
            g = tl.load(LNW + c, mask=c_ok, other=0.0).to(ACC)
            be = tl.load(LNB + c, mask=c_ok, other=0.0).to(ACC)
            y, xh = _ln_tile(X, MU, RSTD, g, be, b, p, p_ok, c, c_ok, P, sxb, sxp, sxd, ACC)
            gs = tl.load(GS + b * N * D + n[:, None] * D + c[None, :], mask=n_ok[:, None] & c_ok[None, :], other=0.0)
            gyg = tl.dot(tl.trans(a), gs, input_precision="ieee") * g[None, :]
            r1 += tl.sum(gyg, 1)
            r2 += tl.sum(gyg * xh, 1)
            ga = tl.dot(gs, tl.trans(y), ga, input_precision="ieee")
        tl.store(GAP + b * N * P + n[:, None] * P + p[None, :], ga, mask=n_ok[:, None] & p_ok[None, :])
        r1 = r1 / D
        r2 = r2 / D
        for c0 in range(0, D, BC):
            c = c0 + tl.arange(0, BC)
            c_ok = c < D
            g = tl.load(LNW + c, mask=c_ok, other=0.0).to(ACC)
            xh, rstd = _xhat_tile(X, MU, RSTD, b, p, p_ok, c, c_ok, P, sxb, sxp, sxd, ACC)
            gs = tl.load(GS + b * N * D + n[:, None] * D + c[None, :], mask=n_ok[:, None] & c_ok[None, :], other=0.0)
            gyg = tl.dot(tl.trans(a), gs, input_precision="ieee") * g[None, :]
            gx = rstd[:, None] * (gyg - r1[:, None] - xh * r2[:, None])
            tl.store(GX + b * P * D + p[:, None] * D + c[None, :], gx.to(GX.dtype.element_ty),
                     mask=p_ok[:, None] & c_ok[None, :])
    # (4) LayerNorm affine partials of this sample: sum_p gy * xhat, sum_p gy
    for c0 in range(0, D, BC):
        c = c0 + tl.arange(0, BC)
        c_ok = c < D
        gs = tl.load(GS + b * N * D + n[:, None] * D + c[None, :], mask=n_ok[:, None] & c_ok[None, :], other=0.0)
        sw = tl.zeros([BC], dtype=ACC)
        sb = tl.zeros([BC], dtype=ACC)
        for p0 in range(0, P, BP):
            p = p0 + tl.arange(0, BP)
            p_ok = p < P
            a = _a_tile(TW, KER, n, n_ok, p, p_ok, W, Hc, Wc, s_twn, K, ACC, BN, BP)
            xh, _r = _xhat_tile(X, MU, RSTD, b, p, p_ok, c, c_ok, P, sxb, sxp, sxd, ACC)
            gy = tl.dot(tl.trans(a), gs, input_precision="ieee")
            sw += tl.sum(gy * xh, 0)
            sb += tl.sum(gy, 0)
        tl.store(GLWP + b * D + c, sw, mask=c_ok)
        tl.store(GLBP + b * D + c, sb, mask=c_ok)


# ---------------------------------------------------------------------------------------------- checks
def _check(x, ln_weight, ln_bias, kernel, tok_weight, tok_bias, w1, w2, H, W, chan_mask, hidden_mask) -> None:
    torch._check(x.dtype in _DTYPES, lambda: f"vapt_prompts: x must be a float tensor, got {x.dtype}")
    tensors = [("ln_weight", ln_weight), ("ln_bias", ln_bias), ("kernel", kernel), ("tok_weight", tok_weight),
               ("w1", w1), ("w2", w2), ("tok_bias", tok_bias), ("chan_mask", chan_mask), ("hidden_mask", hidden_mask)]
    for name, t in tensors:
        if t is not None:
            torch._check(t.dtype == x.dtype, lambda: f"vapt_prompts: {name} dtype {t.dtype} differs from x's {x.dtype}")
    devices = {t.device for _, t in tensors if t is not None} | {x.device}
    torch._check(len(devices) == 1, lambda: f"vapt_prompts: tensors on several devices {sorted(map(str, devices))}")
    try:
        check_vapt_args(x, ln_weight, ln_bias, kernel, tok_weight, tok_bias, w1, w2, (H, W), chan_mask, hidden_mask)
    except ValueError as exc:
        raise RuntimeError(str(exc)) from None


def _shapes(x, kernel, tok_weight, w1, H, W):
    B, P, D = x.shape
    K = kernel.shape[0]
    return B, P, D, tok_weight.shape[0], w1.shape[0], K, H - K + 1, W - K + 1


def _blocks(N, DH, D):
    return dict(BN=_pow2(N), BDH=_pow2(DH), BP=BLOCK_P, BC=max(16, min(triton.next_power_of_2(max(D, 1)), MAX_BLOCK_C)))


# ---------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("fastprompt::vapt_prompts_triton_fwd", mutates_args=())
def _vapt_fwd(
    x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float, kernel: torch.Tensor,
    tok_weight: torch.Tensor, tok_bias: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, H: int, W: int,
    chan_mask: Optional[torch.Tensor], hidden_mask: Optional[torch.Tensor], scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(x, ln_weight, ln_bias, kernel, tok_weight, tok_bias, w1, w2, H, W, chan_mask, hidden_mask)
    B, P, D, N, DH, K, Hc, Wc = _shapes(x, kernel, tok_weight, w1, H, W)
    acc, dev = _acc_dtype(x.dtype), x.device
    out = _empty((B, N, D), x.dtype, dev)
    t = _empty((B, N, D), acc, dev)
    hid = _empty((B, N, DH), acc, dev)
    mu = _empty((B, P), acc, dev)
    rstd = _empty((B, P), acc, dev)
    if B == 0 or N == 0 or D == 0:
        return out.zero_(), t.zero_(), hid.zero_(), mu.zero_(), rstd.zero_()
    kernel = kernel.contiguous()
    _fwd_kernel[(B,)](
        out, t, hid, mu, rstd, x, ln_weight, ln_bias, kernel, tok_weight, tok_bias, w1, w2,
        chan_mask if chan_mask is not None else x, hidden_mask if hidden_mask is not None else x,
        P, D, N, DH, W, Hc, Wc, float(eps), float(scale),
        x.stride(0), x.stride(1), x.stride(2), tok_weight.stride(0), w1.stride(0), w1.stride(1),
        w2.stride(0), w2.stride(1),
        K=K, HAS_CM=chan_mask is not None, HAS_HM=hidden_mask is not None, ACC64=acc == torch.float64,
        num_warps=NUM_WARPS, **_blocks(N, DH, D),
    )
    return out, t, hid, mu, rstd


@_vapt_fwd.register_fake
def _vapt_fwd_fake(x, ln_weight, ln_bias, eps, kernel, tok_weight, tok_bias, w1, w2, H, W, chan_mask, hidden_mask, scale):
    _check(x, ln_weight, ln_bias, kernel, tok_weight, tok_bias, w1, w2, H, W, chan_mask, hidden_mask)
    B, P, D, N, DH, *_ = _shapes(x, kernel, tok_weight, w1, H, W)
    acc = _acc_dtype(x.dtype)
    return (x.new_empty((B, N, D)), x.new_empty((B, N, D), dtype=acc), x.new_empty((B, N, DH), dtype=acc),
            x.new_empty((B, P), dtype=acc), x.new_empty((B, P), dtype=acc))


def _fold_kernel_grads(ga: torch.Tensor, kernel: torch.Tensor, tok_weight: torch.Tensor, H: int, W: int):
    """grad of A [N, H, W] -> (grad kernel [K, K], grad tok_weight [N, H'W']), with fixed-order shifted slices
    (A[:, a + i', b + j'] gathers k[a, b] * Wt[:, i', j'])."""
    K = kernel.shape[0]
    Hc, Wc = H - K + 1, W - K + 1
    N = tok_weight.shape[0]
    wt = tok_weight.to(ga.dtype).view(N, Hc, Wc)
    g_wt = torch.zeros_like(wt)
    g_k = torch.empty((K, K), dtype=ga.dtype, device=ga.device)
    for a in range(K):
        for b in range(K):
            win = ga[:, a:a + Hc, b:b + Wc]
            g_wt = g_wt + kernel[a, b].to(ga.dtype) * win
            g_k[a, b] = (win * wt).sum()
    return g_k, g_wt.reshape(N, Hc * Wc)


@torch.library.custom_op("fastprompt::vapt_prompts_triton_bwd", mutates_args=())
def _vapt_bwd(
    grad_out: torch.Tensor, x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, kernel: torch.Tensor,
    tok_weight: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, H: int, W: int,
    chan_mask: Optional[torch.Tensor], hidden_mask: Optional[torch.Tensor], scale: float,
    t: torch.Tensor, hidden: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, P, D, N, DH, K, Hc, Wc = _shapes(x, kernel, tok_weight, w1, H, W)
    torch._check(tuple(grad_out.shape) == (B, N, D), lambda: f"vapt_prompts_triton_bwd: grad_out must be [{B}, {N}, {D}]")
    acc, dev, dt = _acc_dtype(x.dtype), x.device, x.dtype
    gx = _empty((B, P, D), dt, dev)
    gs = _empty((B, N, D), acc, dev)
    gw1p = _empty((B, DH, D), acc, dev)
    gw2p = _empty((B, D, DH), acc, dev)
    gtbp = _empty((B, N), acc, dev)
    gap = _empty((B, N, P), acc, dev)
    glwp = _empty((B, D), acc, dev)
    glbp = _empty((B, D), acc, dev)
    if B == 0 or N == 0 or D == 0:
        for buf in (gx, gw1p, gw2p, gtbp, gap, glwp, glbp):
            buf.zero_()
    else:
        kernel_c = kernel.contiguous()
        grad_out = grad_out.to(dt)
        _bwd_kernel[(B,)](
            gx, gs, gw1p, gw2p, gtbp, gap, glwp, glbp,
            grad_out, x, ln_weight, ln_bias, kernel_c, tok_weight, w1, w2,
            chan_mask if chan_mask is not None else x, hidden_mask if hidden_mask is not None else x,
            t, hidden, mean, rstd,
            P, D, N, DH, W, Hc, Wc, float(scale),
            grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), x.stride(0), x.stride(1), x.stride(2),
            tok_weight.stride(0), w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(1),
            K=K, HAS_CM=chan_mask is not None, HAS_HM=hidden_mask is not None, ACC64=acc == torch.float64,
            num_warps=NUM_WARPS, **_blocks(N, DH, D),
        )
    # per-sample partials -> batch sums (torch.sum: fixed-order reduction, no atomics)
    g_k, g_tw = _fold_kernel_grads(gap.sum(0).view(N, H, W), kernel, tok_weight, H, W)
    return (gx, glwp.sum(0).to(dt), glbp.sum(0).to(dt), g_k.to(dt), g_tw.to(dt), gtbp.sum(0).to(dt),
            gw1p.sum(0).to(dt), gw2p.sum(0).to(dt))


@_vapt_bwd.register_fake
def _vapt_bwd_fake(grad_out, x, ln_weight, ln_bias, kernel, tok_weight, w1, w2, H, W, chan_mask, hidden_mask, scale,
                   t, hidden, mean, rstd):
    B, P, D, N, DH, K, Hc, Wc = _shapes(x, kernel, tok_weight, w1, H, W)
    return (x.new_empty((B, P, D)), x.new_empty((D,)), x.new_empty((D,)), x.new_empty((K, K)),
            x.new_empty((N, Hc * Wc)), x.new_empty((N,)), x.new_empty((DH, D)), x.new_empty((D, DH)))


def _setup_context(ctx, inputs, output) -> None:
    x, ln_weight, ln_bias, eps, kernel, tok_weight, tok_bias, w1, w2, H, W, chan_mask, hidden_mask, scale = inputs
    _out, t, hid, mu, rstd = output
    ctx.save_for_backward(x, ln_weight, ln_bias, kernel, tok_weight, w1, w2, chan_mask, hidden_mask, t, hid, mu, rstd)
    ctx.H, ctx.W, ctx.scale = H, W, scale
    ctx.mark_non_differentiable(t, hid, mu, rstd)


def _backward(ctx, grad_out, _gt, _gh, _gm, _gr):
    x, ln_weight, ln_bias, kernel, tok_weight, w1, w2, chan_mask, hidden_mask, t, hid, mu, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    if not any(need):
        return (None,) * 14
    gx, glw, glb, gk, gtw, gtb, gw1, gw2 = torch.ops.fastprompt.vapt_prompts_triton_bwd(
        grad_out, x, ln_weight, ln_bias, kernel, tok_weight, w1, w2, ctx.H, ctx.W, chan_mask, hidden_mask,
        ctx.scale, t, hid, mu, rstd,
    )
    pick = lambda g, i: g if need[i] else None  # noqa: E731
    return (pick(gx, 0), pick(glw, 1), pick(glb, 2), None, pick(gk, 4), pick(gtw, 5), pick(gtb, 6),
            pick(gw1, 7), pick(gw2, 8), None, None, None, None, None)


torch.library.register_autograd("fastprompt::vapt_prompts_triton_fwd", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------- public
@register_impl("vapt_prompts", backend="triton")
def vapt_prompts_triton(
    x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float, kernel: torch.Tensor,
    tok_weight: torch.Tensor, tok_bias: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, grid: Tuple[int, int],
    chan_mask: Optional[torch.Tensor] = None, hidden_mask: Optional[torch.Tensor] = None, scale: float = 1.0,
) -> torch.Tensor:
    """VAPT prompts via the fused Triton kernels (same contract as ``vapt_prompts_reference``): x [B, H*W, D]
    -> [B, N, D] in x's dtype, differentiable w.r.t. x and every generator parameter (deterministic backward).
    Runs on CUDA, or on the CPU under TRITON_INTERPRET=1."""
    H, W = (int(v) for v in grid)
    check_vapt_args(x, ln_weight, ln_bias, kernel, tok_weight, tok_bias, w1, w2, (H, W), chan_mask, hidden_mask)
    out, *_ = torch.ops.fastprompt.vapt_prompts_triton_fwd(
        x, ln_weight, ln_bias, float(eps), kernel, tok_weight, tok_bias, w1, w2, H, W, chan_mask, hidden_mask,
        float(scale),
    )
    return out
