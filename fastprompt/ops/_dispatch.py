"""Backend selection shared by every op.

Backends: ``reference`` (eager torch, the contract), ``compiled`` (the C++ CPU / CUDA kernels of
``fastprompt._C``, also reachable by the device names ``cpu`` and ``cuda``), and ``auto`` (the fastest one
present for the tensor's device). ``FASTPROMPT_BACKEND`` sets the default.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Tuple

import torch

BACKENDS = ("auto", "reference", "compiled", "cpu", "cuda")


def default_backend() -> str:
    backend = os.environ.get("FASTPROMPT_BACKEND", "auto").strip().lower() or "auto"
    check_backend(backend)
    return backend


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def resolve(
    op_name: str,
    backend: str,
    device: torch.device,
    available: Dict[str, Callable[[torch.device], Tuple[bool, str]]],
    preference: Tuple[str, ...],
) -> str:
    """Pick a concrete backend name for ``op_name`` on ``device``.

    ``available[name](device)`` returns (usable, why-not). ``auto`` takes the first usable entry of
    ``preference``; an explicit backend that is not usable is an error that says why.
    """
    backend = check_backend(backend)
    if backend == "auto":
        for name in preference:
            ok, _ = available[name](device)
            if ok:
                return name
        return "reference"
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            raise ValueError(f"{op_name}: backend {backend!r} requested for a tensor on {device}")
        backend = "compiled"
    if backend not in available:
        raise ValueError(f"{op_name}: no {backend!r} backend (has: {', '.join(sorted(available))})")
    ok, why = available[backend](device)
    if not ok:
        raise RuntimeError(f"{op_name}: backend {backend!r} is not available on {device}: {why}")
    return backend
