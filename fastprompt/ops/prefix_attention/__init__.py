"""prefix_attention: causal attention of packed class suffixes over their group's shared prefix.

See :func:`fastprompt.ops.prefix_attention.reference.prefix_attention_reference` for the exact definition.
Backends: ``reference`` (that definition), ``eager`` (the same function on eager torch ops without per-pair
prefix copies, saving only its inputs for the backward: what ``auto`` picks on the CPU, and on CUDA without
Triton) and ``triton``.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastprompt.ops._dispatch import cast_inputs_to_autocast, register_op
from fastprompt.ops.prefix_attention.eager import prefix_attention_eager
from fastprompt.ops.prefix_attention.reference import prefix_attention_reference

__all__ = ["prefix_attention", "prefix_attention_reference", "prefix_attention_eager", "OP"]

# Autocast runs the reference's attention in its low-precision dtype. "eager" (the memory-lean torch path) is what
# "auto" picks on the CPU, and on a GPU without Triton.
OP = register_op("prefix_attention", backends={"triton": "triton_impl", "eager": "eager"},
                 preference={"cuda": ("triton", "eager"), "cpu": ("eager",)}, prepare=cast_inputs_to_autocast)


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    cu_seqlens: torch.Tensor,
    g_idx: torch.Tensor,
    max_seqlen: int,
    backend: Optional[str] = None,
    strict: bool = True,
    *,
    pairs_per_group: Optional[int] = None,
) -> torch.Tensor:
    """Shared-prefix causal attention, dispatched by backend.

    Shapes: q, k, v [T, H, dh] (packed suffix rows, T = cu_seqlens[-1]), k_prefix, v_prefix [G, H, P, dh],
    cu_seqlens [N + 1] int32 / int64, g_idx [N] int64 in [0, G), max_seqlen int >= every suffix length
    ->  [T, H, dh] in q's dtype. Suffix row j of pair n attends to the P prefix keys of group g_idx[n] and to
    its own suffix keys 0..j (scale 1/sqrt(dh)). See ``prefix_attention_reference`` for the formula.

    The Triton backend takes float32 / float16 / bfloat16 and dh a power of two >= 16; its backward is
    deterministic.

    ``pairs_per_group`` (optional, eager backend): N / G when pair n reads group n // (N / G) (CoCoOp's
    all-pairs batch); a promise about g_idx that lets the eager backend batch its prefix products per group.
    """
    name = OP.resolve(backend, q.device, strict)
    args = (q, k, v, k_prefix, v_prefix, cu_seqlens, g_idx, max_seqlen)
    if name == "eager":  # the only backend that reads the hint
        args = args + (pairs_per_group,)
    return OP.run(name, *args, device=q.device)
