"""Eager reference of shared-prefix attention: the contract every backend is tested against."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastprompt.ops._dispatch import register_impl


@register_impl("prefix_attention", backend="reference")
def prefix_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    cu_seqlens: torch.Tensor,
    g_idx: torch.Tensor,
    max_seqlen: int,
) -> torch.Tensor:
    """Causal attention of packed class suffixes over their group's prefix plus their own past.

    Pair n owns packed rows ``cu_seqlens[n] .. cu_seqlens[n+1]-1`` (its suffix, length s_n >= 1). Suffix row j of
    pair n attends to all P prefix keys of group ``g = g_idx[n]`` and to its own suffix keys 0..j, with the
    usual 1/sqrt(dh) scale::

        out[row j of n] = softmax([q_j . k_prefix[g, :, p] for p < P] ++ [q_j . k_i for i <= j] / sqrt(dh)) @ [v_prefix[g]; v_0..j]

    Args:
        q, k, v:   [T, H, dh] packed suffix queries / keys / values (T = cu_seqlens[-1]).
        k_prefix, v_prefix: [G, H, P, dh] keys / values of the G shared prefixes (P >= 1).
        cu_seqlens: [N + 1] int64 (or int32), 0 = cu_seqlens[0] < ... cumulative suffix lengths.
        g_idx:     [N] int64, the prefix group of each pair.
        max_seqlen: max_n s_n (the padded width used for attention).

    Returns:
        [T, H, dh] in q's dtype. Differentiable w.r.t. q, k, v, k_prefix and v_prefix (the prefix gradients
        are summed over every pair that reads that prefix).
    """
    T, H, dh = q.shape
    N = g_idx.shape[0]
    S, P = int(max_seqlen), k_prefix.shape[2]
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    # Scatter packed rows into a padded [N, S] layout; pad rows are zero and never read by a valid query.
    rows = torch.arange(S, device=q.device).unsqueeze(0)
    valid = rows < lengths.unsqueeze(1)  # [N, S]
    index = (cu_seqlens[:-1].unsqueeze(1) + rows)[valid]  # packed row of each valid padded slot

    def pad(x):
        out = x.new_zeros(N, S, H, dh)
        out[valid] = x[index]
        return out.transpose(1, 2)  # [N, H, S, dh]

    qs, ks, vs = pad(q), pad(k), pad(v)
    keys = torch.cat([k_prefix.index_select(0, g_idx), ks], dim=2)
    values = torch.cat([v_prefix.index_select(0, g_idx), vs], dim=2)
    own = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    mask = torch.cat([torch.ones(S, P, dtype=torch.bool, device=q.device), own], dim=1)
    out = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask)  # [N, H, S, dh]
    return out.transpose(1, 2)[valid]  # [T, H, dh], rows in packed order
