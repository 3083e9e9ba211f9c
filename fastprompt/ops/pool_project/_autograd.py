"""Autograd glue shared by the compiled and Triton backends of pool_project (same saved state, same formula)."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch


def setup_context(ctx, inputs, output) -> None:
    x, rows, ln_weight, _ln_bias, _eps, proj, normalize = inputs
    out, mean, rstd, norm = output
    ctx.mark_non_differentiable(mean, rstd, norm)
    ctx.save_for_backward(x, rows, ln_weight, proj, out if normalize else None, mean, rstd, norm)
    ctx.normalize = normalize


def make_backward(backward_op: Callable) -> Callable:
    """The autograd backward of a forward op returning (out, mean, rstd, norm); only x gets a gradient."""

    def backward(ctx, grad_out, _grad_mean, _grad_rstd, _grad_norm) -> Tuple[Optional[torch.Tensor], ...]:
        x, rows, ln_weight, proj, out, mean, rstd, norm = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            if out is None:
                out = grad_out.new_empty((0,))  # unused without normalisation
            # The backward runs with the caller's autocast state; the kernel's internal GEMMs must not be recast.
            with torch.autocast(grad_out.device.type, enabled=False):
                grad_x = backward_op(grad_out, out, x, rows, ln_weight, mean, rstd, norm, proj, ctx.normalize)
        # x, rows, ln_weight, ln_bias, eps, proj, normalize
        return grad_x, None, None, None, None, None, None

    return backward
