"""vapt_prompts: VAPT's per-layer prompt generator (LayerNorm -> shared K x K channel conv -> token projector ->
residual feature MLP), as one op.

See :func:`fastprompt.ops.vapt_prompts.reference.vapt_prompts_reference` for the exact definition.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from fastprompt.ops._dispatch import cast_inputs_to_autocast, register_op
from fastprompt.ops.vapt_prompts.reference import dropout_masks, vapt_prompts_reference

__all__ = ["vapt_prompts", "vapt_prompts_reference", "dropout_masks", "OP"]

# No compiled (C++/CUDA) backend: on the CPU the eager reference is GEMM-bound at ViT-B sizes, and on CUDA the
# Triton kernels already make it one launch per direction (see the module doc of triton_impl.py).
# Autocast runs the reference's conv and Linear layers in its low-precision dtype (LayerNorm in float32; the
# kernel normalises in float32 from the low-precision input); the output is the low dtype, as there.
OP = register_op("vapt_prompts", backends={"triton": "triton_impl"}, preference={"cuda": ("triton",), "cpu": ()},
                 prepare=cast_inputs_to_autocast)


def vapt_prompts(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    kernel: torch.Tensor,
    tok_weight: torch.Tensor,
    tok_bias: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    grid: Tuple[int, int],
    chan_mask: Optional[torch.Tensor] = None,
    hidden_mask: Optional[torch.Tensor] = None,
    scale: float = 1.0,
    backend: Optional[str] = None,
    strict: bool = True,
) -> torch.Tensor:
    """One layer's VAPT prompts, dispatched by backend.

    Shapes: x [B, H*W, D] patch tokens, ln_weight / ln_bias [D], kernel [K, K], tok_weight [N, (H-K+1)(W-K+1)],
    tok_bias [N], w1 [Dh, D], w2 [D, Dh], chan_mask [B, D] | None, hidden_mask [B, N, Dh] | None -> [B, N, D].
    See ``vapt_prompts_reference`` for the formula.
    """
    return OP(x, ln_weight, ln_bias, eps, kernel, tok_weight, tok_bias, w1, w2, grid, chan_mask, hidden_mask, scale,
              backend=backend, strict=strict, device=x.device)
