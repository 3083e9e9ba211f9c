"""Triton backend of ``prefix_attention``: shared-prefix causal attention over packed class suffixes.

Importing this module registers two ``torch.library`` custom ops (opaque to ``torch.compile``, checked by
``torch.library.opcheck``), their fake kernels, and the autograd formula of the forward:

* ``fastprompt::prefix_attention_triton_fwd(q, k, v, k_prefix, v_prefix, cu_seqlens, g_idx, max_seqlen)
  -> (out [T, H, dh], lse [T, H] float32)``
* ``fastprompt::prefix_attention_triton_bwd(dout, q, k, v, k_prefix, v_prefix, out, lse, dlse?, cu_seqlens, g_idx,
  max_seqlen) -> (dq, dk, dv, dk_prefix, dv_prefix)``

Kernels (float32 operands multiply in IEEE float32; float16 / bfloat16 operands stay in their dtype in every
``tl.dot`` and run on tensor cores with float32 accumulation; softmax statistics, dq / dk_prefix / dv_prefix
accumulators and the log-sum-exp are float32; outputs in q's dtype):

* forward, one program per (pair, head): the pair's suffix queries [BLOCK_S, dh] (BLOCK_S = next power of two
  >= max_seqlen, at least 16: the smallest dot tile) scan the group's prefix keys in blocks of BLOCK_P with an
  online softmax, then the pair's own suffix keys under the causal mask. The row log-sum-exp (natural log) is
  stored for the backward.
* backward, two kernels so that neither holds every tile at once (register pressure, no spills):
  - rows, one program per (pair, head): ``delta = rowsum(dO * O)`` (stored), then dk / dv of the pair's own
    keys and dq over its own and its group's prefix keys; everything here is private to the pair.
  - prefix, one program per (chunk of pairs, head): dk_prefix / dv_prefix [G, H, P, dh] (summed over every
    pair of a group) by a **deterministic two-pass reduction** instead of float32 atomics: pairs are sorted by
    group (stable sort); each group's pairs are cut into chunks of at most ``pairs_per_chunk`` pairs; a program
    accumulates its chunk's prefix gradient in registers and writes one float32 partial per (chunk, head); a
    third kernel sums each group's partials in chunk order. Results are bitwise reproducible run to run (for a
    given shape; the chunk size only depends on N and H) and the hot spot of CoOp (G = 1: every pair adds into
    the same prefix) has no atomic contention. The partial buffers hold at most
    (N / pairs_per_chunk + min(G, N)) x H x P x dh floats each.

Requirements: q, k, v, k_prefix, v_prefix of one dtype (float32, float16, bfloat16) on one device, last dim
contiguous (other strides are free: q / k / v may be views of a fused qkv projection), dh a power of two
>= 16, cu_seqlens int32 / int64, g_idx int64 in [0, G), max_seqlen >= every suffix length (checked on the CPU
only, as a check on CUDA would need a host sync; an out-of-range g_idx is not checked either).

Limits: the tiles are [BLOCK_S, dh] with BLOCK_S = next_power_of_2(max_seqlen) >= 16, so a batch whose longest
suffix is 17..32 tokens runs 32-row tiles for every pair (packing several short suffixes into one tile is not
done). Launch options come from a fixed table by tile size (``_launch_options``); ``tests/ops/test_aot.py``
compiles the kernels for sm_80 / sm_90 and checks MMA use and spills.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastprompt.ops._dispatch import register_impl

__all__ = ["prefix_attention_triton"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Tuning knobs (module level so tests can force the multi-chunk / multi-prefix-block paths).
PAIRS_PER_CHUNK: Optional[int] = None  # None: chosen from N and H by _pairs_per_chunk
MAX_BLOCK_P = 64  # prefix keys per block (the whole prefix of CLIP prompts, P <= 64, is one block)
_REDUCE_BLOCK = 1024


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer the kernels fully overwrite is allocated here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _pairs_per_chunk(N: int, H: int) -> int:
    """Pairs per backward program: ~1000+ programs in flight, at most 64 pairs serial per program."""
    if PAIRS_PER_CHUNK is not None:
        return max(1, int(PAIRS_PER_CHUNK))
    return min(64, triton.next_power_of_2(max(1, triton.cdiv(N * H, 1024))))


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: float32 operands multiply in IEEE float32 (TF32 would break the float32
    exactness contract); float16 / bfloat16 operands stay in their dtype and run on tensor cores (MMA / wgmma)
    with float32 accumulation, where the precision argument has no effect."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch_options(block_s: int, block_p: int, head_dim: int, dtype: torch.dtype = torch.float32) -> dict:
    """Fixed launch options, chosen by tile shape (no autotuning: a config picked per process could change the
    float32 summation order, and the outputs must be bitwise reproducible).

    num_warps grows with the largest [rows, dh] tile so that the live tiles (q, k, v, kp, vp, the float32
    accumulators; the backward also dq and the prefix-gradient accumulators) fit the 255 registers of a thread
    without spilling; 16-bit operands take half the registers of float32 ones. Checked by compiling for sm_80 /
    sm_90 (tests/ops/test_aot.py): no spills for 16-bit operands up to suffix 64, prefix 77, dh 128; float32
    tiles of suffix 64 or dh 128 do spill (float32 on a GPU is for tests; training runs bf16 / fp16). num_stages=1: the loops run over
    pairs (loads behind a data-dependent index) and over the (usually single) prefix block, so software
    pipelining buys nothing and would double the shared memory of the dot operands."""
    elems = max(block_s, block_p) * head_dim * (2 if dtype == torch.float32 else 1)
    warps = 4 if elems <= 2048 else 8  # 16 warps cap a thread at 128 registers and spill more, not less
    return {"num_warps": warps, "num_stages": 1}


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _fwd_kernel(
    Q, K, V, KP, VP, CU, GIDX, OUT, LSE,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h,
    skp_g, skp_h, skp_p, svp_g, svp_h, svp_p,
    H, P, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr,
):
    LN2: tl.constexpr = 0.6931471805599453
    n = tl.program_id(0)
    h = tl.program_id(1)
    row0 = tl.load(CU + n).to(tl.int64)
    s_len = tl.load(CU + n + 1).to(tl.int64) - row0
    g = tl.load(GIDX + n).to(tl.int64)

    rows = tl.arange(0, BLOCK_S)
    dcol = tl.arange(0, HEAD_DIM)
    pcol = tl.arange(0, BLOCK_P)
    row_ok = rows < s_len
    grow = row0 + rows  # packed row index

    q = tl.load(Q + grow[:, None] * sq_t + h * sq_h + dcol[None, :], mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_S], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([BLOCK_S, HEAD_DIM], tl.float32)

    kp_base = KP + g * skp_g + h * skp_h
    vp_base = VP + g * svp_g + h * svp_h
    for p0 in range(0, P, BLOCK_P):
        p_ok = (p0 + pcol) < P
        kp = tl.load(kp_base + (p0 + pcol)[:, None] * skp_p + dcol[None, :], mask=p_ok[:, None], other=0.0)
        vp = tl.load(vp_base + (p0 + pcol)[:, None] * svp_p + dcol[None, :], mask=p_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(kp), input_precision=PREC) * qk_scale  # log2 domain
        s = tl.where(p_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vp.dtype), vp, input_precision=PREC)
        m_i = m_new

    # the pair's own keys 0..j (every row already saw >= 1 prefix key, so no row is all -inf)
    k = tl.load(K + grow[:, None] * sk_t + h * sk_h + dcol[None, :], mask=row_ok[:, None], other=0.0)
    v = tl.load(V + grow[:, None] * sv_t + h * sv_h + dcol[None, :], mask=row_ok[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    causal = (rows[None, :] <= rows[:, None]) & (rows[None, :] < s_len)
    s = tl.where(causal, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    m_i = m_new

    out = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * LN2  # natural log-sum-exp of the scaled scores
    tl.store(OUT + (grow[:, None] * H + h) * HEAD_DIM + dcol[None, :], out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + grow * H + h, lse, mask=row_ok)


@triton.jit
def _bwd_rows_kernel(
    Q, K, V, KP, VP, O, DO, LSE, DLSE, CU, GIDX, DQ, DK, DV, DELTA,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h,
    skp_g, skp_h, skp_p, svp_g, svp_h, svp_p,
    H, P, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr, HAS_DLSE: tl.constexpr,
    PREC: tl.constexpr,
):
    """dq, dk, dv of one (pair, head): everything private to the pair's rows; stores delta for the prefix pass."""
    LOG2E: tl.constexpr = 1.4426950408889634
    n = tl.program_id(0)
    h = tl.program_id(1)
    row0 = tl.load(CU + n).to(tl.int64)
    s_len = tl.load(CU + n + 1).to(tl.int64) - row0
    g = tl.load(GIDX + n).to(tl.int64)
    qk_scale = sm_scale * LOG2E

    rows = tl.arange(0, BLOCK_S)
    dcol = tl.arange(0, HEAD_DIM)
    pcol = tl.arange(0, BLOCK_P)
    row_ok = rows < s_len
    grow = row0 + rows
    q = tl.load(Q + grow[:, None] * sq_t + h * sq_h + dcol[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + grow[:, None] * sdo_t + h * sdo_h + dcol[None, :], mask=row_ok[:, None], other=0.0)
    o = tl.load(O + (grow[:, None] * H + h) * HEAD_DIM + dcol[None, :], mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + grow * H + h, mask=row_ok, other=0.0) * LOG2E
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    if HAS_DLSE:  # d lse_j / d s_jk = P_jk: folds into delta
        delta -= tl.load(DLSE + grow * H + h, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(DELTA + grow * H + h, delta, mask=row_ok)

    # the pair's own keys
    k = tl.load(K + grow[:, None] * sk_t + h * sk_h + dcol[None, :], mask=row_ok[:, None], other=0.0)
    v = tl.load(V + grow[:, None] * sv_t + h * sv_h + dcol[None, :], mask=row_ok[:, None], other=0.0)
    s_own = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    causal = (rows[None, :] <= rows[:, None]) & row_ok[:, None]
    p_own = tl.where(causal, tl.exp2(s_own - lse2[:, None]), 0.0)
    dv = tl.dot(tl.trans(p_own.to(do.dtype)), do, input_precision=PREC)
    own_off = (grow[:, None] * H + h) * HEAD_DIM + dcol[None, :]
    tl.store(DV + own_off, dv.to(DV.dtype.element_ty), mask=row_ok[:, None])
    dp_own = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds_own = p_own * (dp_own - delta[:, None])
    dk = tl.dot(tl.trans(ds_own.to(q.dtype)), q, input_precision=PREC) * sm_scale
    tl.store(DK + own_off, dk.to(DK.dtype.element_ty), mask=row_ok[:, None])
    dq = tl.dot(ds_own.to(k.dtype), k, input_precision=PREC)

    # the group's prefix keys, block by block
    kp_base = KP + g * skp_g + h * skp_h
    vp_base = VP + g * svp_g + h * svp_h
    for p0 in range(0, P, BLOCK_P):
        p_ok = (p0 + pcol) < P
        kp = tl.load(kp_base + (p0 + pcol)[:, None] * skp_p + dcol[None, :], mask=p_ok[:, None], other=0.0)
        vp = tl.load(vp_base + (p0 + pcol)[:, None] * svp_p + dcol[None, :], mask=p_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(kp), input_precision=PREC) * qk_scale
        p = tl.where(row_ok[:, None] & p_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vp), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kp.dtype), kp, input_precision=PREC)
    tl.store(DQ + own_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _bwd_prefix_kernel(
    Q, KP, VP, DO, LSE, DELTA, CU, ORDER, CH_START, CH_LEN, CH_GROUP, DKP_PART, DVP_PART,
    sq_t, sq_h, sdo_t, sdo_h,
    skp_g, skp_h, skp_p, svp_g, svp_h, svp_p,
    H, P, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr,
):
    """Partial dk_prefix / dv_prefix of one (chunk of same-group pairs, head), summed in registers."""
    LOG2E: tl.constexpr = 1.4426950408889634
    c = tl.program_id(0)
    h = tl.program_id(1)
    start = tl.load(CH_START + c).to(tl.int64)
    n_pairs = tl.load(CH_LEN + c).to(tl.int32)
    g = tl.load(CH_GROUP + c).to(tl.int64)
    qk_scale = sm_scale * LOG2E

    rows = tl.arange(0, BLOCK_S)
    dcol = tl.arange(0, HEAD_DIM)
    pcol = tl.arange(0, BLOCK_P)
    kp_base = KP + g * skp_g + h * skp_h
    vp_base = VP + g * svp_g + h * svp_h
    for p0 in range(0, P, BLOCK_P):
        p_idx = p0 + pcol
        p_ok = p_idx < P
        kp = tl.load(kp_base + p_idx[:, None] * skp_p + dcol[None, :], mask=p_ok[:, None], other=0.0)
        vp = tl.load(vp_base + p_idx[:, None] * svp_p + dcol[None, :], mask=p_ok[:, None], other=0.0)
        acc_dkp = tl.zeros([BLOCK_P, HEAD_DIM], tl.float32)
        acc_dvp = tl.zeros([BLOCK_P, HEAD_DIM], tl.float32)
        for i in range(0, n_pairs):
            n = tl.load(ORDER + start + i).to(tl.int64)
            row0 = tl.load(CU + n).to(tl.int64)
            s_len = tl.load(CU + n + 1).to(tl.int64) - row0
            row_ok = rows < s_len
            grow = row0 + rows
            q = tl.load(Q + grow[:, None] * sq_t + h * sq_h + dcol[None, :], mask=row_ok[:, None], other=0.0)
            do = tl.load(DO + grow[:, None] * sdo_t + h * sdo_h + dcol[None, :], mask=row_ok[:, None], other=0.0)
            lse2 = tl.load(LSE + grow * H + h, mask=row_ok, other=0.0) * LOG2E
            delta = tl.load(DELTA + grow * H + h, mask=row_ok, other=0.0)
            s = tl.dot(q, tl.trans(kp), input_precision=PREC) * qk_scale
            p = tl.where(row_ok[:, None] & p_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
            acc_dvp += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
            dp = tl.dot(do, tl.trans(vp), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            acc_dkp += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
        part_off = ((c.to(tl.int64) * H + h) * P + p_idx[:, None]) * HEAD_DIM + dcol[None, :]
        tl.store(DKP_PART + part_off, acc_dkp * sm_scale, mask=p_ok[:, None])
        tl.store(DVP_PART + part_off, acc_dvp, mask=p_ok[:, None])


@triton.jit
def _reduce_kernel(DKP_PART, DVP_PART, CH_OFF, DKP, DVP, H, PD, BLOCK_E: tl.constexpr):
    """dk_prefix[g, h] = sum of the partials of group g's chunks, in chunk order (deterministic)."""
    g = tl.program_id(0)
    h = tl.program_id(1)
    e = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)
    ok = e < PD
    c0 = tl.load(CH_OFF + g).to(tl.int32)
    c1 = tl.load(CH_OFF + g + 1).to(tl.int32)
    acc_k = tl.zeros([BLOCK_E], tl.float32)
    acc_v = tl.zeros([BLOCK_E], tl.float32)
    for c in range(c0, c1):
        off = (tl.cast(c, tl.int64) * H + h) * PD + e
        acc_k += tl.load(DKP_PART + off, mask=ok, other=0.0)
        acc_v += tl.load(DVP_PART + off, mask=ok, other=0.0)
    out = (g.to(tl.int64) * H + h) * PD + e
    tl.store(DKP + out, acc_k.to(DKP.dtype.element_ty), mask=ok)
    tl.store(DVP + out, acc_v.to(DVP.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------- helpers
def _check_inputs(q, k, v, k_prefix, v_prefix, cu_seqlens, g_idx, max_seqlen) -> None:
    """Shape / dtype checks shared by the real and the fake kernels (no data-dependent checks)."""
    torch._check(q.dim() == 3, lambda: f"prefix_attention: q must be [T, H, dh], got {tuple(q.shape)}")
    T, H, dh = q.shape
    for name, t in (("k", k), ("v", v)):
        torch._check(t.shape == q.shape, lambda: f"prefix_attention: {name} must be {tuple(q.shape)}, got {tuple(t.shape)}")
    torch._check(
        k_prefix.dim() == 4 and k_prefix.shape[1] == H and k_prefix.shape[3] == dh,
        lambda: f"prefix_attention: k_prefix must be [G, H={H}, P, dh={dh}], got {tuple(k_prefix.shape)}",
    )
    torch._check(
        v_prefix.shape == k_prefix.shape,
        lambda: f"prefix_attention: v_prefix must be {tuple(k_prefix.shape)}, got {tuple(v_prefix.shape)}",
    )
    torch._check(k_prefix.shape[2] >= 1, lambda: "prefix_attention: the prefix needs P >= 1 keys")
    torch._check(q.dtype in _DTYPES, lambda: f"prefix_attention (triton): q must be float32, float16 or bfloat16, got {q.dtype}")
    for name, t in (("k", k), ("v", v), ("k_prefix", k_prefix), ("v_prefix", v_prefix)):
        torch._check(t.dtype == q.dtype, lambda: f"prefix_attention: {name} dtype {t.dtype} differs from q dtype {q.dtype}")
    torch._check(
        dh >= 16 and (dh & (dh - 1)) == 0, lambda: f"prefix_attention (triton): dh must be a power of two >= 16, got {dh}"
    )
    torch._check(g_idx.dim() == 1 and g_idx.dtype == torch.int64, lambda: "prefix_attention: g_idx must be [N] int64")
    torch._check(
        cu_seqlens.dtype in (torch.int32, torch.int64), lambda: "prefix_attention: cu_seqlens must be int32 or int64"
    )
    torch._check(
        cu_seqlens.dim() == 1 and cu_seqlens.shape[0] == g_idx.shape[0] + 1,
        lambda: f"prefix_attention: cu_seqlens must be [N + 1] = [{g_idx.shape[0] + 1}], got {tuple(cu_seqlens.shape)}",
    )
    torch._check(max_seqlen >= 1, lambda: f"prefix_attention: max_seqlen must be >= 1, got {max_seqlen}")
    for name, t in (("k", k), ("v", v), ("k_prefix", k_prefix), ("v_prefix", v_prefix), ("cu_seqlens", cu_seqlens), ("g_idx", g_idx)):
        torch._check(t.device == q.device, lambda: f"prefix_attention: {name} is on {t.device}, q on {q.device} (same device needed)")


def _lastdim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _blocks(max_seqlen: int, P: int, head_dim: int) -> Tuple[int, int]:
    block_s = max(16, triton.next_power_of_2(int(max_seqlen)))
    cap = max(16, min(triton.next_power_of_2(MAX_BLOCK_P), 4096 // head_dim))  # bounds shared memory for big dh
    block_p = max(16, min(triton.next_power_of_2(P), cap))
    return block_s, block_p


def _check_lengths(cu_seqlens: torch.Tensor, max_seqlen: int) -> None:
    if cu_seqlens.device.type == "cuda" or cu_seqlens.numel() < 2:
        return  # no host sync on CUDA
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    longest, shortest = int(lengths.max()), int(lengths.min())
    if shortest < 0 or longest > max_seqlen:
        raise RuntimeError(
            f"prefix_attention: suffix lengths must lie in [0, max_seqlen = {max_seqlen}], got [{shortest}, {longest}]"
        )


def _chunks(g_idx: torch.Tensor, G: int, per_chunk: int):
    """Group-sorted pair order and the chunk table of the deterministic prefix-gradient reduction (no host sync).

    Returns order [N], chunk_start / chunk_len / chunk_group [C_max], chunk_off [G + 1] (group g owns chunks
    chunk_off[g] .. chunk_off[g+1]-1), with C_max = N // per_chunk + min(G, N) >= the real number of chunks.
    """
    N, dev = g_idx.shape[0], g_idx.device
    sorted_g, order = torch.sort(g_idx, stable=True)
    pair_off = torch.searchsorted(sorted_g, torch.arange(G + 1, device=dev, dtype=sorted_g.dtype))  # [G + 1]
    counts = pair_off[1:] - pair_off[:-1]
    chunk_off = torch.zeros(G + 1, dtype=torch.int64, device=dev)
    chunk_off[1:] = torch.cumsum(torch.div(counts + per_chunk - 1, per_chunk, rounding_mode="floor"), 0)
    c_max = N // per_chunk + min(G, N)
    c = torch.arange(c_max, device=dev, dtype=torch.int64)
    group = torch.searchsorted(chunk_off[1:], c, right=True)
    used = group < G
    group = group.clamp(max=G - 1)
    start = pair_off[group] + (c - chunk_off[group]) * per_chunk
    length = torch.where(used, (pair_off[group + 1] - start).clamp(0, per_chunk), torch.zeros_like(start))
    return order, start.clamp(max=max(N - 1, 0)), length, group, chunk_off


# ---------------------------------------------------------------------------------------------- launches
def _forward(q, k, v, k_prefix, v_prefix, cu_seqlens, g_idx, max_seqlen):
    T, H, dh = q.shape
    N, P = g_idx.shape[0], k_prefix.shape[2]
    out = _empty((T, H, dh), q.dtype, q.device)
    lse = _empty((T, H), torch.float32, q.device)
    if N == 0 or T == 0:
        return out, lse
    q, k, v = _lastdim_contiguous(q), _lastdim_contiguous(k), _lastdim_contiguous(v)
    k_prefix, v_prefix = _lastdim_contiguous(k_prefix), _lastdim_contiguous(v_prefix)
    cu_seqlens, g_idx = cu_seqlens.contiguous(), g_idx.contiguous()
    block_s, block_p = _blocks(max_seqlen, P, dh)
    _fwd_kernel[(N, H)](
        q, k, v, k_prefix, v_prefix, cu_seqlens, g_idx, out, lse,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_prefix.stride(0), k_prefix.stride(1), k_prefix.stride(2),
        v_prefix.stride(0), v_prefix.stride(1), v_prefix.stride(2),
        H, P, math.log2(math.e) / math.sqrt(dh),
        HEAD_DIM=dh, BLOCK_S=block_s, BLOCK_P=block_p, PREC=_precision(q.dtype), **_launch_options(block_s, block_p, dh, q.dtype),
    )
    return out, lse


def _backward(dout, q, k, v, k_prefix, v_prefix, out, lse, dlse, cu_seqlens, g_idx, max_seqlen):
    T, H, dh = q.shape
    G, _, P, _ = k_prefix.shape
    N = g_idx.shape[0]
    dev = q.device
    dq, dk, dv = (_empty((T, H, dh), q.dtype, dev) for _ in range(3))
    if N == 0 or T == 0:
        zeros = torch.zeros((G, H, P, dh), dtype=k_prefix.dtype, device=dev)
        return dq, dk, dv, zeros, zeros.clone()
    dkp = _empty((G, H, P, dh), k_prefix.dtype, dev)
    dvp = _empty((G, H, P, dh), v_prefix.dtype, dev)
    q, k, v, dout = (_lastdim_contiguous(t) for t in (q, k, v, dout))
    k_prefix, v_prefix = _lastdim_contiguous(k_prefix), _lastdim_contiguous(v_prefix)
    out, lse = out.contiguous(), lse.contiguous()
    if dlse is not None:
        dlse = dlse.contiguous()
    cu_seqlens, g_idx = cu_seqlens.contiguous(), g_idx.contiguous()
    block_s, block_p = _blocks(max_seqlen, P, dh)
    per_chunk = _pairs_per_chunk(N, H)
    order, ch_start, ch_len, ch_group, ch_off = _chunks(g_idx, G, per_chunk)
    c_max = ch_start.shape[0]
    dkp_part = _empty((c_max, H, P, dh), torch.float32, dev)
    dvp_part = _empty((c_max, H, P, dh), torch.float32, dev)
    delta = _empty((T, H), torch.float32, dev)
    strides = (k_prefix.stride(0), k_prefix.stride(1), k_prefix.stride(2), v_prefix.stride(0), v_prefix.stride(1), v_prefix.stride(2))
    _bwd_rows_kernel[(N, H)](
        q, k, v, k_prefix, v_prefix, out, dout, lse, dlse if dlse is not None else lse, cu_seqlens, g_idx,
        dq, dk, dv, delta,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0), dout.stride(1),
        *strides, H, P, 1.0 / math.sqrt(dh),
        HEAD_DIM=dh, BLOCK_S=block_s, BLOCK_P=block_p, HAS_DLSE=dlse is not None, PREC=_precision(q.dtype),
        **_launch_options(block_s, block_p, dh, q.dtype),
    )
    _bwd_prefix_kernel[(c_max, H)](
        q, k_prefix, v_prefix, dout, lse, delta, cu_seqlens, order, ch_start, ch_len, ch_group, dkp_part, dvp_part,
        q.stride(0), q.stride(1), dout.stride(0), dout.stride(1), *strides, H, P, 1.0 / math.sqrt(dh),
        HEAD_DIM=dh, BLOCK_S=block_s, BLOCK_P=block_p, PREC=_precision(q.dtype),
        **_launch_options(block_s, block_p, dh, q.dtype),
    )
    PD = P * dh
    block_e = min(_REDUCE_BLOCK, triton.next_power_of_2(PD))
    _reduce_kernel[(G, H, triton.cdiv(PD, block_e))](dkp_part, dvp_part, ch_off, dkp, dvp, H, PD, BLOCK_E=block_e)
    return dq, dk, dv, dkp, dvp


# ---------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("fastprompt::prefix_attention_triton_fwd", mutates_args=())
def prefix_attention_triton_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    cu_seqlens: torch.Tensor,
    g_idx: torch.Tensor,
    max_seqlen: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    _check_inputs(q, k, v, k_prefix, v_prefix, cu_seqlens, g_idx, max_seqlen)
    _check_lengths(cu_seqlens, max_seqlen)
    return _forward(q, k, v, k_prefix, v_prefix, cu_seqlens, g_idx, max_seqlen)


@prefix_attention_triton_fwd.register_fake
def _(q, k, v, k_prefix, v_prefix, cu_seqlens, g_idx, max_seqlen):
    _check_inputs(q, k, v, k_prefix, v_prefix, cu_seqlens, g_idx, max_seqlen)
    T, H, dh = q.shape
    return q.new_empty((T, H, dh)), q.new_empty((T, H), dtype=torch.float32)


@torch.library.custom_op("fastprompt::prefix_attention_triton_bwd", mutates_args=())
def prefix_attention_triton_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: Optional[torch.Tensor],
    cu_seqlens: torch.Tensor,
    g_idx: torch.Tensor,
    max_seqlen: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(dout, q, k, v, k_prefix, v_prefix, out, lse, dlse, cu_seqlens, g_idx, max_seqlen)


@prefix_attention_triton_bwd.register_fake
def _(dout, q, k, v, k_prefix, v_prefix, out, lse, dlse, cu_seqlens, g_idx, max_seqlen):
    T, H, dh = q.shape
    G, _, P, _ = k_prefix.shape
    grads = [q.new_empty((T, H, dh)) for _ in range(3)]
    grads += [k_prefix.new_empty((G, H, P, dh)), v_prefix.new_empty((G, H, P, dh))]
    return tuple(grads)


def _setup_context(ctx, inputs, output):
    q, k, v, k_prefix, v_prefix, cu_seqlens, g_idx, max_seqlen = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, k_prefix, v_prefix, cu_seqlens, g_idx, out, lse)
    ctx.max_seqlen = max_seqlen
    ctx.set_materialize_grads(False)  # an unused lse (the usual case) then reaches the backward as None


def _backward_formula(ctx, dout, dlse):
    q, k, v, k_prefix, v_prefix, cu_seqlens, g_idx, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dkp, dvp = torch.ops.fastprompt.prefix_attention_triton_bwd(
        dout, q, k, v, k_prefix, v_prefix, out, lse, dlse, cu_seqlens, g_idx, ctx.max_seqlen
    )
    return dq, dk, dv, dkp, dvp, None, None, None


prefix_attention_triton_fwd.register_autograd(_backward_formula, setup_context=_setup_context)


@register_impl("prefix_attention", backend="triton")
def prefix_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    cu_seqlens: torch.Tensor,
    g_idx: torch.Tensor,
    max_seqlen: int,
) -> torch.Tensor:
    """Shared-prefix attention via the Triton kernels (same contract as ``prefix_attention_reference``).

    Args:
        q, k, v:   [T, H, dh] packed suffix queries / keys / values (float32 / float16 / bfloat16, last dim
                   contiguous), dh a power of two >= 16.
        k_prefix, v_prefix: [G, H, P, dh], q's dtype.
        cu_seqlens: [N + 1] int32 / int64 cumulative suffix lengths; g_idx: [N] int64 in [0, G).
        max_seqlen: int >= every suffix length.

    Returns:
        [T, H, dh] in q's dtype, differentiable w.r.t. q, k, v, k_prefix, v_prefix (deterministic backward).
    """
    out, _ = torch.ops.fastprompt.prefix_attention_triton_fwd(q, k, v, k_prefix, v_prefix, cu_seqlens, g_idx, int(max_seqlen))
    return out
