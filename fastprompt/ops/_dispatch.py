"""Backend selection shared by every op.

Backends: ``reference`` (eager torch, the contract), ``triton`` (Triton kernels: CUDA, or the CPU under
``TRITON_INTERPRET=1``), ``compiled`` (the C++ CPU / CUDA kernels of ``fastprompt._C``, also reachable by the
device names ``cpu`` and ``cuda``), and ``auto`` (the fastest one present for the tensor's device; never the
Triton interpreter). ``FASTPROMPT_BACKEND`` sets the default.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple

import torch

BACKENDS = ("auto", "reference", "triton", "compiled", "cpu", "cuda")
Check = Callable[[torch.device], Tuple[bool, str]]


def env_backend() -> str:
    """``FASTPROMPT_BACKEND`` (default ``auto``): an op backend, or ``torch`` (learners: the fast engine on eager
    torch ops; ops: ``reference``)."""
    backend = os.environ.get("FASTPROMPT_BACKEND", "auto").strip().lower() or "auto"
    if backend not in BACKENDS + ("torch",):
        raise ValueError(f"FASTPROMPT_BACKEND={backend!r} is not a backend; choose one of "
                         f"{', '.join(BACKENDS + ('torch',))}")
    return backend


def default_backend() -> str:
    """The op backend ``FASTPROMPT_BACKEND`` selects (``torch`` means the eager ops, ``reference``)."""
    backend = env_backend()
    return "reference" if backend == "torch" else backend


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def reference_ok(device: torch.device) -> Tuple[bool, str]:
    return True, ""


def compiled_ok(device: torch.device) -> Tuple[bool, str]:
    from fastprompt._extension import extension_has_cuda, extension_loaded, load_error

    if not extension_loaded():
        return False, f"fastprompt._C not loaded ({load_error()})"
    if device.type == "cuda" and not extension_has_cuda():
        return False, "fastprompt._C was built without CUDA kernels"
    if device.type not in ("cpu", "cuda"):
        return False, f"no compiled kernel for device type {device.type}"
    return True, ""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_ok(device: torch.device) -> Tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # not installed, or broken
        return False, f"triton not importable ({type(exc).__name__})"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and triton_interpreting():
        return True, ""
    return False, "Triton kernels run on CUDA devices (or on the CPU under TRITON_INTERPRET=1)"


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype in effect for ``device``'s type, or None outside autocast.

    The kernels take one dtype; under autocast each op's dispatcher casts its inputs the way autocast would
    cast the reference's torch ops, then runs the kernel with autocast off (so results match the reference up
    to the rounding of that dtype, and output dtypes are the reference's).
    """
    kind = torch.device(device).type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def cast_floating(dtype: torch.dtype, *tensors):
    """Each floating tensor cast to ``dtype`` (None and integer tensors pass through)."""
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


class OpBackends:
    """The backends one op has, and how ``auto`` ranks them per device type."""

    def __init__(self, op_name: str, available: Dict[str, Check], preference: Dict[str, Tuple[str, ...]]):
        self.op_name = op_name
        self.available = available
        self.preference = preference

    def table(self, device) -> Dict[str, Tuple[bool, str]]:
        """{backend: (usable, why-not)} on ``device``."""
        device = torch.device(device)
        return {name: check(device) for name, check in self.available.items()}

    def resolve(self, backend: Optional[str], device: torch.device, strict: bool = True) -> str:
        """A concrete backend for ``device``.

        ``auto`` takes the first usable entry of the device type's preference. An explicit backend that this op
        lacks is an error when ``strict``, else the reference (a learner-wide "triton" on an op without a Triton
        kernel). An explicit backend the op has but cannot use here is always an error that says why.
        """
        backend = check_backend(backend or default_backend())
        if backend == "auto":
            for name in self.preference.get(device.type, ()):
                if name in self.available and self.available[name](device)[0]:
                    return name
            return "reference"
        if backend in ("cpu", "cuda"):
            if device.type != backend:
                raise ValueError(f"{self.op_name}: backend {backend!r} requested for a tensor on {device}")
            backend = "compiled"
        if backend not in self.available:
            if strict:
                raise ValueError(f"{self.op_name}: no {backend!r} backend (has: {', '.join(sorted(self.available))})")
            return "reference"
        ok, why = self.available[backend](device)
        if not ok:
            raise RuntimeError(f"{self.op_name}: backend {backend!r} is not available on {device}: {why}")
        return backend
