"""The shared op test harness: every registered backend of an op against its eager reference.

``check_op(case)`` runs, for each backend of ``case.op`` usable on the device (Triton on the CPU under
``TRITON_INTERPRET=1``) and each of its dtypes: the forward and the gradient of every floating input that
requires grad, compared with the reference on fresh random inputs (float64 <= 1e-10, float32 <= 1e-5; half
precisions: a small multiple of the error the reference itself makes in that dtype against float64), with
uninitialised memory filled with NaN (``torch.utils.deterministic.fill_uninitialized_memory``) so an output
element a kernel forgets to write fails the check, and ``torch.library.opcheck`` on the custom ops the case
names for the backend.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from fastprompt.ops._dispatch import Op

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@dataclass
class OpCase:
    """op: the registered op. make_inputs(dtype, device, generator) -> the op's positional arguments (floating
    tensors that should be differentiated have requires_grad set). dtypes: {backend: dtypes to check} (default
    float64 and float32). opcheck: {backend: fn(args) -> [(custom op overload, its args)]}."""

    op: Op
    make_inputs: Callable[[torch.dtype, torch.device, torch.Generator], Tuple]
    dtypes: Dict[str, Sequence[torch.dtype]] = field(default_factory=dict)
    opcheck: Dict[str, Callable[[Tuple], List[Tuple]]] = field(default_factory=dict)


@contextlib.contextmanager
def nan_poisoned_memory():
    """torch.empty & co. return NaN-filled memory inside this block (deterministic mode's fill)."""
    was_det = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = was_fill
        torch.use_deterministic_algorithms(was_det, warn_only=was_warn)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (in float64)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def usable_backends(op: Op, device: torch.device) -> List[str]:
    """The op's non-reference backends that can run on ``device`` here."""
    return [name for name, (ok, _) in op.table(device).items() if ok and name != "reference"]


def _leaves(args) -> List[torch.Tensor]:
    return [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


def _fresh(args, dtype: Optional[torch.dtype] = None):
    """Detached copies (cast to ``dtype`` when given) with the same requires_grad."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            b = a.detach().to(dtype or a.dtype).clone().requires_grad_(a.requires_grad)
            out.append(b)
        else:
            out.append(a)
    return tuple(out)


def _run(fn, args, grad_out=None):
    out = fn(*args)
    leaves = _leaves(args)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.device, out.dtype), allow_unused=True) if leaves else ()
    return out, grads, grad_out


def tolerance(case: OpCase, dtype: torch.dtype, device: torch.device, seed: int) -> float:
    """float64 / float32: fixed; half precisions: 4x the reference's own error in ``dtype`` against float64
    (forward and gradients), at least 4 ulps of ``dtype``."""
    if dtype in TOL:
        return TOL[dtype]
    args = case.make_inputs(dtype, device, torch.Generator().manual_seed(seed))
    ref = case.op.impl("reference")
    low_out, low_grads, g = _run(ref, _fresh(args))
    hi_out, hi_grads, _ = _run(ref, _fresh(args, torch.float64), g)
    errs = [rel_err(low_out, hi_out)] + [rel_err(a, b) for a, b in zip(low_grads, hi_grads) if a is not None]
    return max(4 * max(errs), 4 * torch.finfo(dtype).eps)


def check_backend(case: OpCase, backend: str, dtype: torch.dtype, device, seed: int = 0) -> None:
    """One backend, one dtype: forward, every gradient, finiteness under NaN-poisoned memory, opcheck."""
    device = torch.device(device)
    args = case.make_inputs(dtype, device, torch.Generator().manual_seed(seed))
    tol = tolerance(case, dtype, device, seed)
    ref_out, ref_grads, g = _run(case.op.impl("reference"), _fresh(args))
    with nan_poisoned_memory():
        out, grads, _ = _run(lambda *a: case.op(*a, backend=backend, device=device), _fresh(args), g)
    name = f"{case.op.op_name}[{backend}, {dtype}]"
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype, f"{name}: {out.shape}/{out.dtype} vs reference"
    assert torch.isfinite(out).all(), f"{name}: non-finite output (an element left unwritten?)"
    assert rel_err(out, ref_out) <= tol, f"{name}: forward rel err {rel_err(out, ref_out):.3g} > {tol:.3g}"
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        assert (a is None) == (b is None), f"{name}: gradient {i} present in one path only"
        if a is None:
            continue
        assert torch.isfinite(a).all(), f"{name}: non-finite gradient {i}"
        assert rel_err(a, b) <= tol, f"{name}: gradient {i} rel err {rel_err(a, b):.3g} > {tol:.3g}"
    for overload, op_args in case.opcheck.get(backend, lambda _: [])(args):
        torch.library.opcheck(overload, op_args)


def check_op(case: OpCase, device="cpu", seed: int = 0) -> List[str]:
    """Every usable backend of the op in each of its dtypes (see the module docstring) -> the backends checked."""
    device = torch.device(device)
    checked = []
    for backend in usable_backends(case.op, device):
        for dtype in case.dtypes.get(backend, (torch.float64, torch.float32)):
            check_backend(case, backend, dtype, device, seed)
        checked.append(backend)
    return checked
