"""Triton backend of ``condition``: the conditioning MLP fused into one forward and two backward launches.

Same contract as :func:`fastprompt.ops.condition.reference.condition_reference`::

    two layers:  out = act((scale * x) @ w1.T + b1) @ w2.T + b2
    one layer:   out = (scale * x) @ w1.T + b1                  (w2 None; b2 and activation are then unused)

Importing this module registers two ``torch.library`` custom ops (opaque to ``torch.compile``, checked by
``torch.library.opcheck``), their fake kernels, and the autograd formula of the forward:

* ``fastprompt::condition_triton_fwd(x, w1, b1?, w2?, b2?, activation, negative_slope, scale)
  -> (out [B, Dout], hidden [B, Dh] pre-activation in the accumulation dtype, or [0] for one layer)``
* ``fastprompt::condition_triton_bwd(grad_out, x, w1, w2?, hidden, activation, negative_slope, scale, has_b1,
  has_b2) -> (grad_x, grad_w1, grad_b1 | [0], grad_w2 | [0], grad_b2 | [0])``

The shapes are tiny (CoCoOp: B = 32, 512 -> 32 -> 512), so the eager reference is launch-bound (2 GEMMs + bias +
activation forward, ~8 kernels backward); fusing it into 1 + 2 launches is the whole point (torch matmuls in the
backward would bring the launches back). Kernels:

* forward, one program per (block of 16 rows, block of BN outputs): the hidden layer of its rows is computed in
  registers, hidden chunk by hidden chunk (x @ w1.T over Din in BK steps), activated and immediately contracted
  with w2's [BN, BH] tile. Programs of different output blocks recompute the same hidden rows: w1 is 64 KB and
  read from L2, which is cheaper than a second launch. The programs of output block 0 store the pre-activation
  hidden layer (float32) for the backward, so the activation derivative is taken from the unrounded value.
* backward 1 (two layers only), one launch with two kinds of program: (a) per (BN outputs, BH hidden):
  grad_w2 = grad_out.T @ act(h) and grad_b2 = grad_out.sum(0), over all B rows; (b) per (16 rows, BH hidden):
  grad_h = (grad_out @ w2) * act'(h), stored in float32.
* backward 2, one launch with two kinds of program: (a) per (BH hidden, BK inputs): grad_w1 = scale * grad_h.T @ x
  and grad_b1 = grad_h.sum(0); (b) per (16 rows, BK inputs): grad_x = scale * grad_h @ w1.
  For one layer, grad_h is grad_out itself and backward 1 is skipped.

Every reduction (over B, Din, Dh or Dout) runs inside one program in a fixed order: no atomics, bitwise
reproducible. Arithmetic is float32 (float64 for float64 inputs): tiles are upcast right after their load and
``tl.dot`` runs with ``input_precision="ieee"`` (not TF32, whose 10-bit mantissa would miss the 1e-5 contract);
results are rounded once, on store, to the parameter's / input's dtype. All tensors must share x's dtype and
device. ``tl.dot`` needs tiles of at least 16 in every dimension: rows, hidden units and columns are padded to 16
with masked loads (zeros), which contribute nothing to any sum.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastprompt.ops.condition.reference import ACTIVATIONS
from fastprompt.ops._dispatch import register_impl

__all__ = ["condition_triton"]

_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_ACT_CODE = {"none": 0, "relu": 1, "leaky_relu": 2}

# Tile caps. The float32 "ieee" tl.dot is FMA-based and register-hungry: with 8 warps these tiles compile for
# sm_90 without spills (ptxas -v: 64-150 registers per thread); larger hidden chunks or 4 warps spill.
BLOCK_B = 16  # rows per program (tl.dot's minimum); B <= 64 in practice
MAX_BLOCK_H = 32  # hidden units per chunk (CoCoOp's 32 hidden units: one chunk)
MAX_BLOCK_N = 64  # output columns per forward program (and per one-layer program)
MAX_BLOCK_N_BWD = 32  # output columns per grad_w2 program / per step of grad_h
MAX_BLOCK_K = 64  # input columns per step / program
NUM_WARPS = 8


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every float buffer the kernels fully overwrite is allocated here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _block(n: int, cap: int) -> int:
    return max(16, min(triton.next_power_of_2(max(n, 1)), cap))


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _act(h, ACT: tl.constexpr, slope):
    if ACT == 1:
        h = tl.where(h > 0, h, 0.0)
    elif ACT == 2:
        h = tl.where(h > 0, h, h * slope)
    return h


@triton.jit
def _act_grad(g, h, ACT: tl.constexpr, slope):
    # derivative taken at h > 0 strictly, as torch's relu / leaky_relu backward (0 at h == 0 for relu)
    if ACT == 1:
        g = tl.where(h > 0, g, 0.0)
    elif ACT == 2:
        g = tl.where(h > 0, g, g * slope)
    return g


@triton.jit
def _hidden_tile(X, W1, B1, rows, r_ok, hc, h_ok, DIN, scale, s_xb, s_xk, s_w1h, s_w1k, s_b1,
                 HAS_B1: tl.constexpr, ACC: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr):
    """[BB, BH] pre-activation (scale * x[rows]) @ w1[hc].T + b1[hc], accumulated in ACC."""
    h = tl.zeros([BB, BH], dtype=ACC)
    for k0 in range(0, DIN, BK):
        k = k0 + tl.arange(0, BK)
        k_ok = k < DIN
        xt = tl.load(X + rows[:, None] * s_xb + k[None, :] * s_xk, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        # scale x before the product, as the reference does (x * scale, then the GEMM)
        xt = xt.to(ACC) * scale
        wt = tl.load(W1 + hc[None, :] * s_w1h + k[:, None] * s_w1k, mask=h_ok[None, :] & k_ok[:, None], other=0.0)
        h = tl.dot(xt, wt.to(ACC), h, input_precision="ieee")
    if HAS_B1:
        h += tl.load(B1 + hc * s_b1, mask=h_ok, other=0.0).to(ACC)[None, :]
    return h


@triton.jit
def _fwd_kernel(
    OUT, HID, X, W1, B1, W2, B2,
    B, DIN, DH, DOUT, scale, slope,
    s_xb, s_xk, s_w1h, s_w1k, s_b1, s_w2n, s_w2h, s_b2,
    TWO_LAYER: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, ACT: tl.constexpr, ACC64: tl.constexpr,
    BB: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr, BN: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if ACC64 else tl.float32
    OUT_T: tl.constexpr = OUT.dtype.element_ty
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    r_ok = rows < B
    nb = tl.program_id(1)
    if TWO_LAYER:
        n = nb * BN + tl.arange(0, BN)
        n_ok = n < DOUT
        o = tl.zeros([BB, BN], dtype=ACC)
        for h0 in range(0, DH, BH):
            hc = h0 + tl.arange(0, BH)
            h_ok = hc < DH
            h = _hidden_tile(X, W1, B1, rows, r_ok, hc, h_ok, DIN, scale, s_xb, s_xk, s_w1h, s_w1k, s_b1,
                             HAS_B1, ACC, BB, BH, BK)
            if nb == 0:  # one copy of the pre-activation for the backward
                tl.store(HID + rows[:, None] * DH + hc[None, :], h, mask=r_ok[:, None] & h_ok[None, :])
            a = _act(h, ACT, slope)  # padded hidden units are 0 and stay 0 (act(0) = 0)
            w2t = tl.load(W2 + n[None, :] * s_w2n + hc[:, None] * s_w2h, mask=n_ok[None, :] & h_ok[:, None], other=0.0)
            o = tl.dot(a, w2t.to(ACC), o, input_precision="ieee")
        if HAS_B2:
            o += tl.load(B2 + n * s_b2, mask=n_ok, other=0.0).to(ACC)[None, :]
        tl.store(OUT + rows[:, None] * DOUT + n[None, :], o.to(OUT_T), mask=r_ok[:, None] & n_ok[None, :])
    else:
        hc = nb * BH + tl.arange(0, BH)
        h_ok = hc < DH
        h = _hidden_tile(X, W1, B1, rows, r_ok, hc, h_ok, DIN, scale, s_xb, s_xk, s_w1h, s_w1k, s_b1,
                         HAS_B1, ACC, BB, BH, BK)
        tl.store(OUT + rows[:, None] * DH + hc[None, :], h.to(OUT_T), mask=r_ok[:, None] & h_ok[None, :])


@triton.jit
def _bwd_hidden_kernel(
    GH, GW2, GB2, G, HID, W2,
    B, DH, DOUT, slope,
    s_gb, s_gn, s_w2n, s_w2h,
    HAS_B2: tl.constexpr, ACT: tl.constexpr, ACC64: tl.constexpr,
    BB: tl.constexpr, BH: tl.constexpr, BN: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if ACC64 else tl.float32
    W_T: tl.constexpr = GW2.dtype.element_ty
    pid = tl.program_id(0)
    n_h = tl.cdiv(DH, BH)
    n_w2 = tl.cdiv(DOUT, BN) * n_h
    if pid < n_w2:  # (a) grad_w2[nb, hb] and grad_b2[nb]: reduce over every row
        nb = pid // n_h
        hb = pid % n_h
        n = nb * BN + tl.arange(0, BN)
        n_ok = n < DOUT
        hc = hb * BH + tl.arange(0, BH)
        h_ok = hc < DH
        gw = tl.zeros([BN, BH], dtype=ACC)
        gb = tl.zeros([BN], dtype=ACC)
        for b0 in range(0, B, BB):
            rows = b0 + tl.arange(0, BB)
            r_ok = rows < B
            gt = tl.load(G + rows[:, None] * s_gb + n[None, :] * s_gn, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            gt = gt.to(ACC)
            h = tl.load(HID + rows[:, None] * DH + hc[None, :], mask=r_ok[:, None] & h_ok[None, :], other=0.0)
            gw = tl.dot(tl.trans(gt), _act(h.to(ACC), ACT, slope), gw, input_precision="ieee")
            gb += tl.sum(gt, axis=0)
        tl.store(GW2 + n[:, None] * DH + hc[None, :], gw.to(W_T), mask=n_ok[:, None] & h_ok[None, :])
        if HAS_B2:
            if hb == 0:
                tl.store(GB2 + n, gb.to(W_T), mask=n_ok)
    else:  # (b) grad_h[rows, hb] = (grad_out[rows] @ w2[:, hb]) * act'(h)
        q = pid - n_w2
        rows = (q // n_h) * BB + tl.arange(0, BB)
        r_ok = rows < B
        hc = (q % n_h) * BH + tl.arange(0, BH)
        h_ok = hc < DH
        ga = tl.zeros([BB, BH], dtype=ACC)
        for n0 in range(0, DOUT, BN):
            n = n0 + tl.arange(0, BN)
            n_ok = n < DOUT
            gt = tl.load(G + rows[:, None] * s_gb + n[None, :] * s_gn, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            w2t = tl.load(W2 + n[:, None] * s_w2n + hc[None, :] * s_w2h, mask=n_ok[:, None] & h_ok[None, :], other=0.0)
            ga = tl.dot(gt.to(ACC), w2t.to(ACC), ga, input_precision="ieee")
        h = tl.load(HID + rows[:, None] * DH + hc[None, :], mask=r_ok[:, None] & h_ok[None, :], other=0.0)
        gh = _act_grad(ga, h.to(ACC), ACT, slope)
        # kept in the accumulation dtype: grad_w1 / grad_b1 / grad_x are sums of it (no rounding in between)
        tl.store(GH + rows[:, None] * DH + hc[None, :], gh, mask=r_ok[:, None] & h_ok[None, :])


@triton.jit
def _bwd_input_kernel(
    GX, GW1, GB1, GH, X, W1,
    B, DIN, DH, scale,
    s_hb, s_hh, s_xb, s_xk, s_w1h, s_w1k,
    HAS_B1: tl.constexpr, ACC64: tl.constexpr,
    BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if ACC64 else tl.float32
    W_T: tl.constexpr = GW1.dtype.element_ty
    pid = tl.program_id(0)
    n_k = tl.cdiv(DIN, BK)
    n_w1 = tl.cdiv(DH, BH) * n_k
    if pid < n_w1:  # (a) grad_w1[hb, kb] = scale * grad_h[:, hb].T @ x[:, kb]; grad_b1[hb] = colsum(grad_h)
        hb = pid // n_k
        kb = pid % n_k
        hc = hb * BH + tl.arange(0, BH)
        h_ok = hc < DH
        k = kb * BK + tl.arange(0, BK)
        k_ok = k < DIN
        gw = tl.zeros([BH, BK], dtype=ACC)
        gb = tl.zeros([BH], dtype=ACC)
        for b0 in range(0, B, BB):
            rows = b0 + tl.arange(0, BB)
            r_ok = rows < B
            gh = tl.load(GH + rows[:, None] * s_hb + hc[None, :] * s_hh, mask=r_ok[:, None] & h_ok[None, :], other=0.0)
            gh = gh.to(ACC)
            xt = tl.load(X + rows[:, None] * s_xb + k[None, :] * s_xk, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            gw = tl.dot(tl.trans(gh), xt.to(ACC) * scale, gw, input_precision="ieee")
            gb += tl.sum(gh, axis=0)
        tl.store(GW1 + hc[:, None] * DIN + k[None, :], gw.to(W_T), mask=h_ok[:, None] & k_ok[None, :])
        if HAS_B1:
            if kb == 0:
                tl.store(GB1 + hc, gb.to(W_T), mask=h_ok)
    else:  # (b) grad_x[rows, kb] = scale * grad_h[rows] @ w1[:, kb]
        q = pid - n_w1
        rows = (q // n_k) * BB + tl.arange(0, BB)
        r_ok = rows < B
        k = (q % n_k) * BK + tl.arange(0, BK)
        k_ok = k < DIN
        gx = tl.zeros([BB, BK], dtype=ACC)
        for h0 in range(0, DH, BH):
            hc = h0 + tl.arange(0, BH)
            h_ok = hc < DH
            gh = tl.load(GH + rows[:, None] * s_hb + hc[None, :] * s_hh, mask=r_ok[:, None] & h_ok[None, :],
                         other=0.0)
            wt = tl.load(W1 + hc[:, None] * s_w1h + k[None, :] * s_w1k, mask=h_ok[:, None] & k_ok[None, :],
                         other=0.0)
            gx = tl.dot(gh.to(ACC), wt.to(ACC), gx, input_precision="ieee")
        gx = gx * scale
        tl.store(GX + rows[:, None] * DIN + k[None, :], gx.to(GX.dtype.element_ty),
                 mask=r_ok[:, None] & k_ok[None, :])


# ---------------------------------------------------------------------------------------------- checks
def _check_inputs(x, w1, b1, w2, b2, activation) -> None:
    """Shape / dtype checks shared by the fake and the real kernel (torch._check raises RuntimeError)."""
    torch._check(
        activation in ACTIVATIONS, lambda: f"condition: activation must be one of {ACTIVATIONS}, got {activation!r}"
    )
    torch._check(x.dim() == 2, lambda: f"condition: x must be [B, Din], got {tuple(x.shape)}")
    torch._check(
        x.dtype in _DTYPES, lambda: f"condition: x must be float64, float32, float16 or bfloat16, got {x.dtype}"
    )
    torch._check(
        w1.dim() == 2 and w1.shape[1] == x.shape[1],
        lambda: f"condition: w1 must be [Dh, Din = {x.shape[1]}], got {tuple(w1.shape)}",
    )
    Dh = w1.shape[0]
    tensors = [("w1", w1)]
    if b1 is not None:
        torch._check(
            b1.dim() == 1 and b1.shape[0] == Dh, lambda: f"condition: b1 must be [{Dh}], got {tuple(b1.shape)}"
        )
        tensors.append(("b1", b1))
    if w2 is not None:
        torch._check(
            w2.dim() == 2 and w2.shape[1] == Dh,
            lambda: f"condition: w2 must be [Dout, Dh = {Dh}], got {tuple(w2.shape)}",
        )
        tensors.append(("w2", w2))
        if b2 is not None:
            torch._check(
                b2.dim() == 1 and b2.shape[0] == w2.shape[0],
                lambda: f"condition: b2 must be [{w2.shape[0]}], got {tuple(b2.shape)}",
            )
            tensors.append(("b2", b2))
    for name, t in tensors:
        torch._check(t.dtype == x.dtype, lambda: f"condition: {name} dtype {t.dtype} differs from x dtype {x.dtype}")


def _check_devices(*tensors) -> None:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise RuntimeError(f"condition: all tensors must be on the same device, got {sorted(map(str, devices))}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("fastprompt::condition_triton_fwd", mutates_args=())
def _condition_fwd(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: Optional[torch.Tensor],
    b2: Optional[torch.Tensor],
    activation: str,
    negative_slope: float,
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    _check_inputs(x, w1, b1, w2, b2, activation)
    _check_devices(x, w1, b1, w2, b2)
    B, Din = x.shape
    Dh = w1.shape[0]
    two = w2 is not None
    Dout = w2.shape[0] if two else Dh
    out = _empty((B, Dout), x.dtype, x.device)
    hid = _empty((B, Dh) if two else (0,), _acc_dtype(x.dtype), x.device)
    if out.numel() == 0:
        hid.zero_()  # only ever multiplied by an empty / zero upstream gradient; no garbage in the saved tensor
        return out, hid
    bk = _block(Din, MAX_BLOCK_K)
    if two:
        bh, bn = _block(Dh, MAX_BLOCK_H), _block(Dout, MAX_BLOCK_N)
        grid = (triton.cdiv(B, BLOCK_B), triton.cdiv(Dout, bn))
    else:  # one layer: a program's hidden chunk is its output block
        bh = bn = _block(Dh, MAX_BLOCK_N)
        grid = (triton.cdiv(B, BLOCK_B), triton.cdiv(Dh, bh))
    dummy = x  # pointer for absent tensors, never read (the constexpr flags drop those loads)
    _fwd_kernel[grid](
        out, hid if two else out, x, w1, b1 if b1 is not None else dummy, w2 if two else dummy,
        b2 if (two and b2 is not None) else dummy,
        B, Din, Dh, Dout, float(scale), float(negative_slope),
        x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), b1.stride(0) if b1 is not None else 0,
        w2.stride(0) if two else 0, w2.stride(1) if two else 0, b2.stride(0) if (two and b2 is not None) else 0,
        TWO_LAYER=two, HAS_B1=b1 is not None, HAS_B2=two and b2 is not None, ACT=_ACT_CODE[activation],
        ACC64=x.dtype == torch.float64, BB=BLOCK_B, BK=bk, BH=bh, BN=bn, num_warps=NUM_WARPS,
    )
    return out, hid


@_condition_fwd.register_fake
def _condition_fwd_fake(x, w1, b1, w2, b2, activation, negative_slope, scale):
    _check_inputs(x, w1, b1, w2, b2, activation)
    B, Dh = x.shape[0], w1.shape[0]
    Dout = w2.shape[0] if w2 is not None else Dh
    hid = x.new_empty((B, Dh) if w2 is not None else (0,), dtype=_acc_dtype(x.dtype))
    return x.new_empty((B, Dout)), hid


def _check_bwd(grad_out, x, w1, w2, hid) -> None:
    B, Din = x.shape
    Dh = w1.shape[0]
    Dout = w2.shape[0] if w2 is not None else Dh
    torch._check(
        grad_out.dim() == 2 and grad_out.shape[0] == B and grad_out.shape[1] == Dout,
        lambda: f"condition_backward: grad_out must be [{B}, {Dout}], got {tuple(grad_out.shape)}",
    )
    if w2 is not None:
        torch._check(
            hid.dim() == 2 and hid.shape[0] == B and hid.shape[1] == Dh,
            lambda: f"condition_backward: hidden must be [{B}, {Dh}], got {tuple(hid.shape)}",
        )


@torch.library.custom_op("fastprompt::condition_triton_bwd", mutates_args=())
def _condition_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: Optional[torch.Tensor],
    hidden: torch.Tensor,
    activation: str,
    negative_slope: float,
    scale: float,
    has_b1: bool,
    has_b2: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_bwd(grad_out, x, w1, w2, hidden)
    _check_devices(grad_out, x, w1, w2, hidden)
    B, Din = x.shape
    Dh = w1.shape[0]
    two = w2 is not None
    Dout = w2.shape[0] if two else Dh
    dev, dt, acc = x.device, x.dtype, _acc_dtype(x.dtype)
    grad_x = _empty((B, Din), dt, dev)
    grad_w1 = _empty((Dh, Din), dt, dev)
    grad_b1 = _empty((Dh,) if has_b1 else (0,), dt, dev)
    grad_w2 = _empty((Dout, Dh) if two else (0,), dt, dev)
    grad_b2 = _empty((Dout,) if (two and has_b2) else (0,), dt, dev)
    if B == 0:  # sums over no rows
        for t in (grad_w1, grad_b1, grad_w2, grad_b2):
            t.zero_()
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2
    act = _ACT_CODE[activation]
    bh = _block(Dh, MAX_BLOCK_H)
    if two:
        bn = _block(Dout, MAX_BLOCK_N_BWD)
        grad_h = _empty((B, Dh), acc, dev)
        n_h = triton.cdiv(Dh, bh)
        grid = (triton.cdiv(Dout, bn) * n_h + triton.cdiv(B, BLOCK_B) * n_h,)
        _bwd_hidden_kernel[grid](
            grad_h, grad_w2, grad_b2 if has_b2 else grad_w2, grad_out, hidden, w2,
            B, Dh, Dout, float(negative_slope),
            grad_out.stride(0), grad_out.stride(1), w2.stride(0), w2.stride(1),
            HAS_B2=has_b2, ACT=act, ACC64=acc == torch.float64, BB=BLOCK_B, BH=bh, BN=bn, num_warps=NUM_WARPS,
        )
    else:
        grad_h = grad_out  # one layer: the output is the hidden layer
    if Din == 0:
        if has_b1:
            grad_b1.copy_(grad_h.sum(0, dtype=acc))
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2
    bk = _block(Din, MAX_BLOCK_K)
    n_k = triton.cdiv(Din, bk)
    grid = (triton.cdiv(Dh, bh) * n_k + triton.cdiv(B, BLOCK_B) * n_k,)
    _bwd_input_kernel[grid](
        grad_x, grad_w1, grad_b1 if has_b1 else grad_w1, grad_h, x, w1,
        B, Din, Dh, float(scale),
        grad_h.stride(0), grad_h.stride(1), x.stride(0), x.stride(1), w1.stride(0), w1.stride(1),
        HAS_B1=has_b1, ACC64=acc == torch.float64, BB=BLOCK_B, BH=bh, BK=bk, num_warps=NUM_WARPS,
    )
    return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


@_condition_bwd.register_fake
def _condition_bwd_fake(grad_out, x, w1, w2, hidden, activation, negative_slope, scale, has_b1, has_b2):
    _check_bwd(grad_out, x, w1, w2, hidden)
    B, Din = x.shape
    Dh = w1.shape[0]
    two = w2 is not None
    Dout = w2.shape[0] if two else Dh
    return (
        x.new_empty((B, Din)),
        x.new_empty((Dh, Din)),
        x.new_empty((Dh,) if has_b1 else (0,)),
        x.new_empty((Dout, Dh) if two else (0,)),
        x.new_empty((Dout,) if (two and has_b2) else (0,)),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, w1, b1, w2, b2, activation, negative_slope, scale = inputs
    _out, hidden = output
    ctx.save_for_backward(x, w1, w2, hidden)
    ctx.has_b1, ctx.has_b2 = b1 is not None, w2 is not None and b2 is not None
    ctx.activation, ctx.negative_slope, ctx.scale = activation, negative_slope, scale
    ctx.mark_non_differentiable(hidden)


def _backward(ctx, grad_out, _grad_hidden):
    x, w1, w2, hidden = ctx.saved_tensors
    if not any(ctx.needs_input_grad[:5]):
        return (None,) * 8
    gx, gw1, gb1, gw2, gb2 = torch.ops.fastprompt.condition_triton_bwd(
        grad_out.to(x.dtype), x, w1, w2, hidden, ctx.activation, ctx.negative_slope, ctx.scale, ctx.has_b1, ctx.has_b2
    )
    need = ctx.needs_input_grad
    return (
        gx if need[0] else None,
        gw1 if need[1] else None,
        gb1 if (need[2] and ctx.has_b1) else None,
        gw2 if (need[3] and w2 is not None) else None,
        gb2 if (need[4] and ctx.has_b2) else None,
        None, None, None,  # activation, negative_slope, scale
    )


torch.library.register_autograd("fastprompt::condition_triton_fwd", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------- public
@register_impl("condition", backend="triton")
def condition_triton(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: Optional[torch.Tensor],
    b2: Optional[torch.Tensor],
    activation: str = "relu",
    negative_slope: float = 0.01,
    scale: float = 1.0,
) -> torch.Tensor:
    """The conditioning MLP via the fused Triton kernels (same contract as ``condition_reference``).

    ``act((scale * x) @ w1.T + b1) @ w2.T + b2``, or ``(scale * x) @ w1.T + b1`` when ``w2`` is None.
    x [B, Din], w1 [Dh, Din], b1 [Dh] | None, w2 [Dout, Dh] | None, b2 [Dout] | None, all of x's dtype
    (float64 / float32 / float16 / bfloat16) and device -> [B, Dout] in x's dtype, differentiable w.r.t. x, w1,
    b1, w2, b2 (deterministic backward). Runs on CUDA, or on the CPU under TRITON_INTERPRET=1.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if w2 is None:
        b2 = None  # unused by the one-layer form (as in the reference)
    out, _hidden = torch.ops.fastprompt.condition_triton_fwd(
        x, w1, b1, w2, b2, activation, float(negative_slope), float(scale)
    )
    return out
