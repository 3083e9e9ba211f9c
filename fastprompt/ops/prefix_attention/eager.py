"""Memory-lean eager backend of ``prefix_attention`` (plain torch ops, any device; the CPU default).

The reference builds, per pair, a copy of its group's prefix keys / values concatenated with its own suffix
keys / values and calls ``scaled_dot_product_attention``; autograd then keeps those per-pair copies (and the
padded inputs and probabilities) alive until the backward. This backend computes the same function with a
``torch.autograd.Function`` that saves only its inputs (which the surrounding layer keeps anyway: q / k / v
are views of the fused qkv projection) and the row log-sum-exp [T, H], and recomputes the probabilities in
the backward, as flash attention does.

Layout: the packed rows are gathered into a padded [N, H, S, dh] layout (S = max_seqlen) with an index table
built on the device from ``cu_seqlens`` (no host sync, no data-dependent shape: T, N, S come from the tensor
shapes and the ``max_seqlen`` int). Prefix scores are grouped products against the distinct prefixes, never a
per-pair copy of them:

* G = 1 (one context, CoOp): ``q [N, H, S, dh] @ k_prefix[0]^T`` broadcasts the single prefix;
* ``pairs_per_group`` = N / G given (pairs of group g are the contiguous block g, as CoCoOp's all-pairs
  batch is laid out): a batched product over [G, N / G, ...] against k_prefix [G, 1, ...];
* otherwise (g_idx unknown to the host): a per-pair gather of the prefix keys / values that lives only during
  the forward (or the backward) call; it is never saved for the backward.

One softmax runs over the concatenated [prefix scores | causal suffix scores] of each row. Pad query rows
(slot j >= s_n) are computed and dropped; pad keys are never visible to a valid row (j' <= j < s_n).
"""
from __future__ import annotations

import math
import weakref
from typing import Optional, Tuple

import torch

from fastprompt.ops._dispatch import register_impl

__all__ = ["prefix_attention_eager"]


def _layout(cu_seqlens: torch.Tensor, T: int, N: int, S: int):
    """Device-side index tables (no host sync).

    Returns (pad_rows [N * S] packed row of each padded slot, clamped into [0, T); valid [N, S, 1, 1] bool;
    rows: (pair [T], position [T]) the padded slot (n, j) of each packed row; future [S, S] bool, True above the
    diagonal: the keys a suffix query must not see).
    """
    dev = cu_seqlens.device
    cu = cu_seqlens.to(torch.int64)
    j = torch.arange(S, device=dev)
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    valid = j.unsqueeze(0) < lengths.unsqueeze(1)  # [N, S]
    pad_rows = (starts.unsqueeze(1) + j).clamp(max=max(T - 1, 0)).reshape(-1)
    t = torch.arange(T, device=dev)
    pair = torch.searchsorted(cu[1:].contiguous(), t, right=True).clamp(max=max(N - 1, 0))  # pair of each row
    position = t - starts.index_select(0, pair)
    future = torch.ones(S, S, dtype=torch.bool, device=dev).triu(1)
    return pad_rows, valid.view(N, S, 1, 1), (pair, position), future


# The last layout built, as (weak reference to its cu_seqlens, (version, T, N, S), tables): every layer of one
# forward and of its backward passes the same cu_seqlens tensor, so the tables are built once per step instead of
# twice per layer. Keyed on the tensor object itself (a weak reference: a freed tensor never matches, even if a
# new one reuses its memory) and its version counter (an in-place change rebuilds). One tuple, assigned at once,
# so a backward on another thread sees either the old entry or the new one.
_LAST_LAYOUT: Optional[Tuple] = None


def _cached_layout(cu_seqlens: torch.Tensor, T: int, N: int, S: int):
    """:func:`_layout`, reusing the last result for the same ``cu_seqlens`` tensor and sizes."""
    global _LAST_LAYOUT
    if torch.compiler.is_compiling():  # traced once into the graph; nothing to reuse across calls
        return _layout(cu_seqlens, T, N, S)
    key = (cu_seqlens._version, T, N, S)
    last = _LAST_LAYOUT
    if last is not None and last[0]() is cu_seqlens and last[1] == key:
        return last[2]
    tables = _layout(cu_seqlens, T, N, S)
    _LAST_LAYOUT = (weakref.ref(cu_seqlens), key, tables)
    return tables


def _pad(x: torch.Tensor, pad_rows: torch.Tensor, valid: torch.Tensor, N: int, S: int) -> torch.Tensor:
    """[T, H, dh] packed -> [N, H, S, dh] padded, contiguous, pad slots zero.

    Pad slots are zeroed (not just masked later): they gather another pair's row, and a masked probability
    0 times a non-finite value of that row would still be NaN. Made contiguous once here: each padded tensor
    feeds two or three matmuls, which would copy a strided operand each time."""
    rows = x.index_select(0, pad_rows).view(N, S, x.shape[1], x.shape[2])
    rows = torch.where(valid, rows, torch.zeros((), dtype=x.dtype, device=x.device))
    return rows.transpose(1, 2).contiguous()


def _unpad(x: torch.Tensor, rows) -> torch.Tensor:
    """[N, H, S, dh] padded -> [T, H, dh] packed: one gather of slot (pair, position) per row (no transposed
    copy of the padded tensor first)."""
    pair, position = rows
    return x[pair, :, position]


class _Prefix:
    """Products of padded per-pair tensors [N, H, S, *] with the group prefixes [G, H, P, dh], grouped by g."""

    def __init__(self, k_prefix: torch.Tensor, v_prefix: torch.Tensor, g_idx: torch.Tensor, pairs_per_group: Optional[int]):
        self.G, self.N = k_prefix.shape[0], g_idx.shape[0]
        self.kp, self.vp, self.g_idx = k_prefix, v_prefix, g_idx
        if self.G == 1:
            self.mode = "one"
        elif pairs_per_group is not None and pairs_per_group * self.G == self.N:
            self.mode, self.R = "blocks", pairs_per_group
        else:  # no structure known: the prefix rows of each pair, transient (freed when the call returns)
            self.mode = "gather"
            self.kp_n, self.vp_n = k_prefix.index_select(0, g_idx), v_prefix.index_select(0, g_idx)

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.G, self.R, *x.shape[1:])

    def mul(self, x: torch.Tensor, which: str, transpose: bool) -> torch.Tensor:
        """x [N, H, S, a] @ (prefix [.., P, dh] transposed if ``transpose``) -> [N, H, S, b]."""
        pre = {"k": self.kp, "v": self.vp}[which]
        if self.mode == "one":
            w = pre[0].transpose(-1, -2) if transpose else pre[0]
            return torch.matmul(x, w)  # broadcast over N
        if self.mode == "blocks":
            w = pre.unsqueeze(1)
            w = w.transpose(-1, -2) if transpose else w
            return torch.matmul(self._grouped(x), w).reshape(*x.shape[:-1], w.shape[-1])
        w = self.kp_n if which == "k" else self.vp_n
        return torch.matmul(x, w.transpose(-1, -2) if transpose else w)

    def grad(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """sum over the pairs n of group g and slots s of a[n, h, s, :]^T b[n, h, s, :] -> [G, H, P, dh]."""
        N, H, S, P = a.shape
        if self.mode == "one":  # one product over the merged (n, s) axis
            at = a.permute(1, 3, 0, 2).reshape(H, P, N * S)
            return torch.matmul(at, b.transpose(0, 1).reshape(H, N * S, -1)).unsqueeze(0)
        if self.mode == "blocks":
            R = self.R
            at = a.reshape(self.G, R, H, S, P).permute(0, 2, 4, 1, 3).reshape(self.G, H, P, R * S)
            bt = b.reshape(self.G, R, H, S, -1).permute(0, 2, 1, 3, 4).reshape(self.G, H, R * S, -1)
            return torch.matmul(at, bt)
        per_pair = torch.matmul(a.transpose(-1, -2), b)  # [N, H, P, dh]
        out = per_pair.new_zeros(self.G, H, P, b.shape[-1])
        return out.index_add_(0, self.g_idx, per_pair)


def _probs(qs, ks, pre: _Prefix, scale: float, lse: Optional[torch.Tensor], future: torch.Tensor):
    """Scaled scores [N, H, S, P + S] (suffix part causal: ``future`` [S, S] masked) -> (probabilities, row
    log-sum-exp [N, H, S])."""
    s_pre = pre.mul(qs, "k", transpose=True) * scale
    s_own = torch.matmul(qs, ks.transpose(-1, -2)) * scale
    s_own = s_own.masked_fill(future, float("-inf"))
    scores = torch.cat([s_pre, s_own], dim=-1)  # one softmax over prefix and own keys
    if lse is None:
        lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse.unsqueeze(-1)), lse


class _PrefixAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, k_prefix, v_prefix, cu_seqlens, g_idx, max_seqlen, pairs_per_group):
        T, H, dh = q.shape
        N, S, P = g_idx.shape[0], int(max_seqlen), k_prefix.shape[2]
        scale = 1.0 / math.sqrt(dh)
        pad_rows, valid, rows, future = _cached_layout(cu_seqlens, T, N, S)
        pre = _Prefix(k_prefix, v_prefix, g_idx, pairs_per_group)
        qs, ks, vs = (_pad(x, pad_rows, valid, N, S) for x in (q, k, v))
        probs, lse = _probs(qs, ks, pre, scale, None, future)
        out = pre.mul(probs[..., :P], "v", transpose=False) + torch.matmul(probs[..., P:], vs)  # [N, H, S, dh]
        lse_rows = _unpad(lse.unsqueeze(-1), rows).squeeze(-1)  # [T, H]
        ctx.save_for_backward(q, k, v, k_prefix, v_prefix, cu_seqlens, g_idx, lse_rows)
        ctx.max_seqlen, ctx.pairs_per_group = S, pairs_per_group
        return _unpad(out, rows)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, k_prefix, v_prefix, cu_seqlens, g_idx, lse_rows = ctx.saved_tensors
        T, H, dh = q.shape
        N, S, P = g_idx.shape[0], ctx.max_seqlen, k_prefix.shape[2]
        scale = 1.0 / math.sqrt(dh)
        pad_rows, valid, rows, future = _cached_layout(cu_seqlens, T, N, S)
        pre = _Prefix(k_prefix, v_prefix, g_idx, ctx.pairs_per_group)
        qs, ks, vs = (_pad(x, pad_rows, valid, N, S) for x in (q, k, v))
        lse = _pad(lse_rows.unsqueeze(-1), pad_rows, valid, N, S).squeeze(-1)
        probs, _ = _probs(qs, ks, pre, scale, lse, future)
        # pad query rows carry no gradient (zero q and lse there give finite probabilities, dropped here)
        probs = torch.where(valid.view(N, 1, S, 1), probs, torch.zeros((), dtype=probs.dtype, device=probs.device))
        do = _pad(dout, pad_rows, valid, N, S)
        p_pre, p_own = probs[..., :P], probs[..., P:]
        dp = torch.cat([pre.mul(do, "v", transpose=True), torch.matmul(do, vs.transpose(-1, -2))], dim=-1)
        # softmax backward: dS = P * (dP - rowsum(P * dP)); rowsum(P * dP) = dO . O, without keeping O
        ds = probs * (dp - (probs * dp).sum(-1, keepdim=True))
        ds_pre, ds_own = ds[..., :P], ds[..., P:]
        dq = (pre.mul(ds_pre, "k", transpose=False) + torch.matmul(ds_own, ks)) * scale
        dk = torch.matmul(ds_own.transpose(-1, -2), qs) * scale
        dv = torch.matmul(p_own.transpose(-1, -2), do)
        dkp = pre.grad(ds_pre, qs) * scale
        dvp = pre.grad(p_pre, do)
        # pad slots of dk / dv only gather zeros (no valid row sees a pad key), and _unpad drops them
        return (_unpad(dq, rows), _unpad(dk, rows), _unpad(dv, rows), dkp, dvp,
                None, None, None, None)


@register_impl("prefix_attention", backend="eager")
def prefix_attention_eager(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    cu_seqlens: torch.Tensor,
    g_idx: torch.Tensor,
    max_seqlen: int,
    pairs_per_group: Optional[int] = None,
) -> torch.Tensor:
    """Shared-prefix attention on eager torch ops, saving only the inputs and a [T, H] log-sum-exp.

    Same contract as ``prefix_attention_reference``: q, k, v [T, H, dh]; k_prefix, v_prefix [G, H, P, dh];
    cu_seqlens [N + 1] int32 / int64; g_idx [N] int64; max_seqlen int >= every suffix length -> [T, H, dh].
    ``pairs_per_group`` (optional): N / G when pair n reads group n // (N / G) (a promise about g_idx, not
    checked: a check would be a host sync); it turns the prefix products into one batched product per group.
    """
    if q.shape[0] == 0 or g_idx.shape[0] == 0:
        return prefix_attention_empty(q, k, v, k_prefix, v_prefix)
    return _PrefixAttention.apply(q, k, v, k_prefix, v_prefix, cu_seqlens, g_idx, int(max_seqlen), pairs_per_group)


def prefix_attention_empty(q, k, v, k_prefix, v_prefix) -> torch.Tensor:
    """No rows: an empty output still connected to every input (zero gradients)."""
    zero = (k_prefix.sum() + v_prefix.sum()) * 0
    return q * 0 + k * 0 + v * 0 + zero
