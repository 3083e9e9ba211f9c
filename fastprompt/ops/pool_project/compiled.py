"""Compiled backend of ``pool_project``: the C++ / CUDA kernels of ``fastprompt._C``.

Importing this module registers, for ``torch.ops.fastprompt.pool_project_compiled_fwd`` / ``pool_project_compiled_bwd``:

* fake (meta) kernels, so the ops trace under ``torch.compile`` / ``torch.export`` without running;
* the autograd formula of ``pool_project_compiled_fwd`` (gradient for ``x`` only; the statistics it also returns are
  not differentiable).

It raises ImportError when the extension is not loaded; ``fastprompt.ops.pool_project.pool_project`` only imports
it after checking ``extension_loaded()``.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastprompt._extension import extension_loaded, load_error
from fastprompt.ops.pool_project._autograd import make_backward, setup_context
from fastprompt.ops._dispatch import register_impl

if not extension_loaded():
    raise ImportError(f"fastprompt._C is not available: {load_error()}")

__all__ = ["pool_project_compiled"]

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@register_impl("pool_project", backend="compiled")
def pool_project_compiled(
    x: torch.Tensor,
    rows: Optional[torch.Tensor],
    ln_weight: Optional[torch.Tensor],
    ln_bias: Optional[torch.Tensor],
    eps: float,
    proj: Optional[torch.Tensor],
    normalize: bool,
) -> torch.Tensor:
    """Pooled, projected text features via the fused kernels (same contract as ``pool_project_reference``).

    ``out[n] = normalize?( LayerNorm(x[rows[n]]; ln_weight, ln_bias, eps) @ proj )``

    Args:
        x:         [T, W] float64 / float32 / float16 / bfloat16 hidden states (packed rows).
        rows:      [N] int64 rows of x to pool, in [0, T) (repeats allowed), or None for every row (N = T).
        ln_weight: [W] or None, frozen LayerNorm scale (any float dtype; used in the accumulation type).
        ln_bias:   [W] or None, frozen LayerNorm shift.
        eps:       LayerNorm epsilon (>= 0).
        proj:      [W, E] or None (identity, E = W), frozen projection.
        normalize: L2-normalise each output row (eps 1e-12, as ``F.normalize``).

    Returns:
        [N, E] in x's dtype, differentiable w.r.t. ``x`` only: ``grad_x`` has x's shape, zero on rows never
        gathered, summed over repeated rows. All inputs must be on one device (CPU, or CUDA when the extension
        was built with CUDA). Row indices are checked with a clear error on CPU; on CUDA an out-of-range index
        trips a device-side assert (checking would need a host sync).

    Precision: statistics and elementwise math in float32 (float64 for float64 x). On CPU every intermediate
    (LayerNorm output, projection, gradients) stays in that accumulation type; on CUDA the intermediates are in
    x's dtype, as the reference rounds them, so that the GEMMs run at the input precision.
    """
    return torch.ops.fastprompt.pool_project_compiled_fwd(x, rows, ln_weight, ln_bias, float(eps), proj, bool(normalize))[0]


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------- fake kernels
def _check_common(op, x, rows, ln_weight, proj):
    torch._check(x.dim() == 2, lambda: f"{op}: x must be [T, W], got {tuple(x.shape)}")
    torch._check(x.dtype in _FLOAT_DTYPES, lambda: f"{op}: unsupported x dtype {x.dtype}")
    W = x.shape[1]
    if rows is not None:
        torch._check(rows.dtype == torch.int64, lambda: f"{op}: rows must be int64, got {rows.dtype}")
        torch._check(rows.dim() == 1, lambda: f"{op}: rows must be 1-D [N], got {tuple(rows.shape)}")
    if ln_weight is not None:
        torch._check(
            ln_weight.dim() == 1 and ln_weight.shape[0] == W,
            lambda: f"{op}: ln_weight must be [W] = [{W}], got {tuple(ln_weight.shape)}",
        )
    if proj is not None:
        torch._check(
            proj.dim() == 2 and proj.shape[0] == W,
            lambda: f"{op}: proj must be [W, E] with W = {W}, got {tuple(proj.shape)}",
        )
    N = x.shape[0] if rows is None else rows.shape[0]
    E = W if proj is None else proj.shape[1]
    return N, W, E


@torch.library.register_fake("fastprompt::pool_project_compiled_fwd")
def _pool_project_compiled_fwd_fake(x, rows, ln_weight, ln_bias, eps, proj, normalize):
    N, W, E = _check_common("pool_project", x, rows, ln_weight, proj)
    if ln_bias is not None:
        torch._check(
            ln_bias.dim() == 1 and ln_bias.shape[0] == W,
            lambda: f"pool_project: ln_bias must be [W] = [{W}], got {tuple(ln_bias.shape)}",
        )
    sdt = _stats_dtype(x.dtype)
    out = x.new_empty((N, E))
    mean = x.new_empty((N,), dtype=sdt)
    rstd = x.new_empty((N,), dtype=sdt)
    norm = x.new_empty((N if normalize else 0,), dtype=sdt)
    return out, mean, rstd, norm


@torch.library.register_fake("fastprompt::pool_project_compiled_bwd")
def _pool_project_backward_fake(grad_out, out, x, rows, ln_weight, mean, rstd, norm, proj, normalize):
    N, W, E = _check_common("pool_project_compiled_bwd", x, rows, ln_weight, proj)
    torch._check(
        grad_out.dim() == 2 and grad_out.shape[0] == N and grad_out.shape[1] == E,
        lambda: f"pool_project_compiled_bwd: grad_out must be [N, E] = [{N}, {E}], got {tuple(grad_out.shape)}",
    )
    return x.new_empty(x.shape)


# ---------------------------------------------------------------------------------------------- autograd


torch.library.register_autograd(
    "fastprompt::pool_project_compiled_fwd",
    make_backward(torch.ops.fastprompt.pool_project_compiled_bwd),
    setup_context=setup_context,
)
