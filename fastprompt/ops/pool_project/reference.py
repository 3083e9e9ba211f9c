"""Eager reference of pool-project: EOT gather, final LayerNorm, projection, L2 normalisation."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastprompt.ops._dispatch import register_impl


@register_impl("pool_project", backend="reference")
def pool_project_reference(
    x: torch.Tensor,
    rows: Optional[torch.Tensor],
    ln_weight: Optional[torch.Tensor],
    ln_bias: Optional[torch.Tensor],
    eps: float,
    proj: Optional[torch.Tensor],
    normalize: bool,
) -> torch.Tensor:
    """Text features from the last hidden states, as CLIP's ``encode_text`` ends.

    ``out[n] = normalize?( LayerNorm(x[rows[n]]; ln_weight, ln_bias, eps) @ proj )``

    Args:
        x:     [T, W] hidden states after the last block (packed rows).
        rows:  [N] int64 rows to pool (each prompt's EOT), or None for all rows (N = T).
        ln_weight, ln_bias: [W] frozen ``ln_final`` affine parameters (None: no affine).
        eps:   LayerNorm epsilon.
        proj:  [W, E] frozen ``text_projection`` (None: identity, E = W).
        normalize: L2-normalise each output row.

    Returns:
        [N, E] in x's dtype. Differentiable w.r.t. x only (the CLIP weights are frozen).
    """
    h = x if rows is None else x.index_select(0, rows)
    h = F.layer_norm(h, (h.shape[-1],), ln_weight, ln_bias, eps)
    if proj is not None:
        h = h @ proj.to(h.dtype)
    return F.normalize(h, dim=-1) if normalize else h
