"""assemble: packed prompt input embeddings (context + conditional shift + class tokens + positions).

See :func:`fastprompt.ops.assemble.reference.assemble_reference` for the exact definition.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastprompt._extension import extension_has_cuda, extension_loaded, load_error
from fastprompt.ops._dispatch import default_backend, resolve
from fastprompt.ops.assemble.reference import assemble_reference

__all__ = ["assemble", "assemble_reference", "available_backends"]


def _compiled_ok(device: torch.device):
    if not extension_loaded():
        return False, f"fastprompt._C not loaded ({load_error()})"
    if device.type == "cuda" and not extension_has_cuda():
        return False, "fastprompt._C was built without CUDA kernels"
    if device.type not in ("cpu", "cuda"):
        return False, f"no compiled kernel for device type {device.type}"
    return True, ""


_AVAILABLE = {"reference": lambda device: (True, ""), "compiled": _compiled_ok}
_PREFERENCE = ("compiled", "reference")


def available_backends(device: torch.device) -> dict:
    """{backend: (usable, why-not)} for this op on ``device``."""
    return {name: check(torch.device(device)) for name, check in _AVAILABLE.items()}


def assemble(
    ctx: torch.Tensor,
    shift: Optional[torch.Tensor],
    fixed: torch.Tensor,
    slot: torch.Tensor,
    pos: torch.Tensor,
    pos_offset: int,
    g_idx: torch.Tensor,
    c_idx: torch.Tensor,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Packed prompt embeddings, dispatched by backend.

    Shapes: ctx [G, M, D], shift [G, D] | None, fixed [C, L, D], slot [C, L] int64, pos [P_total, D],
    g_idx [N] int64, c_idx [N] int64  ->  [N, L, D]. See ``assemble_reference`` for the formula.
    """
    name = resolve("assemble", backend or default_backend(), ctx.device, _AVAILABLE, _PREFERENCE)
    if name == "compiled":
        from fastprompt.ops.assemble.compiled import assemble_compiled

        return assemble_compiled(ctx, shift, fixed, slot, pos, pos_offset, g_idx, c_idx)
    return assemble_reference(ctx, shift, fixed, slot, pos, pos_offset, g_idx, c_idx)
