"""The op registry: backend selection, autocast casting and dispatch for every op, in one place.

Backends: ``reference`` (eager torch, the contract), ``triton`` (Triton kernels: CUDA, or the CPU under
``TRITON_INTERPRET=1``), ``compiled`` (the C++ CPU / CUDA kernels of ``fastprompt._C``, also reachable by the
device names ``cpu`` and ``cuda``), and ``auto`` (the fastest one present for the tensor's device; never the
Triton interpreter). ``FASTPROMPT_BACKEND`` sets the default.

An op is a folder ``fastprompt/ops/<op>/``. Its ``__init__.py`` declares the op once::

    OP = register_op("my_op", backends={"triton": "triton_impl"}, preference={"cuda": ("triton",)},
                     prepare=cast_to_autocast_dtype)

    def my_op(x, w, backend=None, strict=True):
        \"\"\"Shapes ...\"\"\"
        return OP(x, w, backend=backend, strict=strict, device=x.device)

and each backend file registers its function with one decorator (the reference too)::

    @register_impl("my_op", backend="triton")
    def my_op_triton(x, w): ...

``backends`` maps each non-reference backend to the module (in the op's folder) holding its implementation:
the module is imported the first time that backend runs, so an optional dependency (Triton, the compiled
extension) is only needed by the backend that uses it. Whether a backend can run on a device is answered by
the checks of :data:`BACKEND_CHECKS`, without importing its module; ``fastprompt env`` prints them for every
op in :func:`registered_ops`. ``prepare(args, low_dtype)`` casts the inputs of a non-reference backend the way
the reference's torch ops would be cast (``low_dtype``: the autocast dtype, or None outside autocast) and
returns (args, a function applied to the output); the kernel then runs with autocast off.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

import fastprompt.ops as ops_pkg
from fastprompt._extension import extension_has_cuda, extension_loaded, load_error

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
    try:  # an optional dependency
        import triton  # noqa: F401  (optional dependency)
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


# How each backend kind says whether it can run on a device (a backend of an op is usable iff its check passes).
# "eager": an op-specific eager torch path that computes what the reference does in another way (less memory);
# reachable through "auto" only, never named by users (it is not in BACKENDS).
BACKEND_CHECKS: Dict[str, Check] = {"reference": reference_ok, "compiled": compiled_ok, "triton": triton_ok,
                                    "eager": reference_ok}
Prepare = Callable[[Tuple[Any, ...], Optional[torch.dtype]], Tuple[Tuple[Any, ...], Callable]]


def _identity(out):
    return out


class Op(OpBackends):
    """One registered op: its backends (:class:`OpBackends`), their implementations, and the input casting of
    its non-reference backends. Calling it dispatches: ``op(*args, backend=None, strict=True, device=...)``."""

    def __init__(self, name: str, backends: Mapping[str, str], preference: Dict[str, Tuple[str, ...]],
                 prepare: Optional[Prepare], package: str):
        available = {"reference": reference_ok}
        for backend in backends:
            if backend not in BACKEND_CHECKS:
                raise ValueError(f"op {name}: unknown backend kind {backend!r}; known: {', '.join(BACKEND_CHECKS)}")
            available[backend] = BACKEND_CHECKS[backend]
        super().__init__(name, available, preference)
        self.modules = {"reference": "reference", **dict(backends)}
        self.package = package
        self.prepare = prepare
        self.impls: Dict[str, Callable] = {}

    def impl(self, backend: str) -> Callable:
        """The function registered for ``backend`` (importing its module on first use)."""
        if backend not in self.impls:
            importlib.import_module(f"{self.package}.{self.modules[backend]}")
            if backend not in self.impls:
                raise RuntimeError(f"{self.package}.{self.modules[backend]} registered no {backend!r} implementation "
                                   f"of {self.op_name} (@register_impl({self.op_name!r}, backend={backend!r}))")
        return self.impls[backend]

    def __call__(self, *args, backend: Optional[str] = None, strict: bool = True, device: torch.device):
        return self.run(self.resolve(backend, torch.device(device), strict), *args, device=device)

    def run(self, name: str, *args, device: torch.device):
        """Run the implementation of the resolved backend ``name`` (what :meth:`resolve` returned) on ``args``,
        with the op's autocast casting. For an op whose backends take different extra arguments (a hint only one
        of them reads), the op's function resolves first and passes each backend its own arguments."""
        if name == "reference" or self.prepare is None:
            return self.impl(name)(*args)
        low = autocast_dtype(device)
        args, post = self.prepare(tuple(args), low)
        if low is None:
            return post(self.impl(name)(*args))
        with torch.autocast(torch.device(device).type, enabled=False):
            return post(self.impl(name)(*args))


_OPS: Dict[str, Op] = {}
# Implementations registered before their op (a backend module imported while its package's __init__ runs).
_PENDING: Dict[str, Dict[str, Callable]] = {}


def register_op(name: str, backends: Mapping[str, str], preference: Dict[str, Tuple[str, ...]],
                prepare: Optional[Prepare] = None, package: Optional[str] = None) -> Op:
    """Declare op ``name`` (its folder's ``__init__.py`` calls this once) -> the :class:`Op` to call.

    backends: {backend: module in the op's package} for each non-reference backend (the reference always lives
    in ``reference.py``). preference: {device type: backends ``auto`` tries in order}. prepare: the input casting
    of non-reference backends (see the module docstring). package: where the modules are (default
    ``fastprompt.ops.<name>``).
    """
    if name in _OPS:
        raise ValueError(f"op {name!r} is already registered")
    op = Op(name, backends, preference, prepare, package or f"fastprompt.ops.{name}")
    for backend, fn in _PENDING.pop(name, {}).items():
        if backend not in op.available:
            raise ValueError(f"register_impl: op {name!r} declares no backend {backend!r}")
        op.impls[backend] = fn
    _OPS[name] = op
    return op


def register_impl(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: make the function ``op``'s implementation on ``backend`` (declared by :func:`register_op`)."""

    def wrap(fn: Callable) -> Callable:
        if op not in _OPS:  # its package is still importing: register_op picks it up
            _PENDING.setdefault(op, {})[backend] = fn
            return fn
        spec = _OPS[op]
        if backend not in spec.available:
            raise ValueError(f"register_impl: op {op!r} declares no backend {backend!r} "
                             f"(has: {', '.join(sorted(spec.available))})")
        spec.impls[backend] = fn
        return fn

    return wrap


def unregister_op(name: str) -> Op:
    """Remove an op from the registry (e.g. a toy op a test registered) and return it."""
    return _OPS.pop(name)


def registered_ops(import_all: bool = True) -> Dict[str, Op]:
    """{op name: :class:`Op`} of every registered op; ``import_all`` first imports every op package under
    ``fastprompt.ops`` (an op package that fails to import is reported as that exception instead)."""
    out: Dict[str, Any] = {}
    if import_all:
        for info in pkgutil.iter_modules(ops_pkg.__path__):
            if info.ispkg:
                try:
                    importlib.import_module(f"fastprompt.ops.{info.name}")
                except Exception as exc:
                    out[info.name] = exc
    out.update(_OPS)
    return dict(sorted(out.items()))


def cast_inputs_to_autocast(args: Tuple[Any, ...], low: Optional[torch.dtype]):
    """``prepare`` of an op whose reference runs every floating input in the autocast dtype (Linear, matmul,
    attention): each floating tensor cast to it; nothing outside autocast."""
    return (cast_floating(low, *args) if low is not None else args), _identity
