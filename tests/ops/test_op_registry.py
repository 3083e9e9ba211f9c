"""The op registry and the shared harness: a toy op (``out = x * w + b``, rows of x scaled per column) defined in
this file only, with an eager reference and a Triton backend (a ``fastprompt::toy_axpb_triton_{fwd,bwd}`` custom
op pair), registered with ``register_op`` / ``@register_impl`` and checked by ``tests.ops.harness.check_op``;
then the harness on the real ``condition`` op. Triton runs on the CPU under TRITON_INTERPRET=1."""
from __future__ import annotations

import os

import pytest
import torch

import fastprompt
from fastprompt.ops._dispatch import register_impl, register_op, registered_ops, triton_ok, unregister_op
from tests.ops.harness import OpCase, check_op, usable_backends

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not triton_ok(DEVICE)[0], reason=triton_ok(DEVICE)[1])
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
NAME = "toy_axpb"


def toy_reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x [N, D], w [D], b [D] -> [N, D] = x * w + b."""
    return x * w + b


@triton.jit
def _axpb_fwd(X, W, B, OUT, N, D, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(X + row * D + cols, mask=mask)
    w = tl.load(W + cols, mask=mask)
    b = tl.load(B + cols, mask=mask)
    tl.store(OUT + row * D + cols, x * w + b, mask=mask)


@torch.library.custom_op("fastprompt::toy_axpb_triton_fwd", mutates_args=())
def _fwd(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    x, w, b = x.contiguous(), w.contiguous(), b.contiguous()
    out = torch.empty_like(x)  # NaN-filled under the harness: every element must be written
    N, D = x.shape
    _axpb_fwd[(N,)](x, w, b, out, N, D, BLOCK=triton.next_power_of_2(D))
    return out


@_fwd.register_fake
def _(x, w, b):
    return torch.empty_like(x)


@torch.library.custom_op("fastprompt::toy_axpb_triton_bwd", mutates_args=())
def _bwd(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
    # eager sums: the toy's point is the forward kernel and the registration, not a fused backward
    return [grad * w, (grad * x).sum(0), grad.sum(0)]


@_bwd.register_fake
def _(grad, x, w):
    return [torch.empty_like(x), torch.empty_like(w), torch.empty_like(w)]


def _setup(ctx, inputs, output):
    x, w, _ = inputs
    ctx.save_for_backward(x, w)


def _backward(ctx, grad):
    x, w = ctx.saved_tensors
    return tuple(_bwd(grad, x, w))


torch.library.register_autograd("fastprompt::toy_axpb_triton_fwd", _backward, setup_context=_setup)


def toy_triton(x, w, b):
    return _fwd(x, w, b)


@pytest.fixture(scope="module")
def toy_op():
    op = register_op(NAME, backends={"triton": "test_op_registry"}, preference={"cuda": ("triton",)},
                     package="tests.ops")
    register_impl(NAME, backend="reference")(toy_reference)
    register_impl(NAME, backend="triton")(toy_triton)
    try:
        yield op
    finally:
        unregister_op(NAME)


def toy_inputs(dtype, device, gen):
    x = torch.randn(5, 24, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_()
    w = torch.randn(24, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_()
    b = torch.randn(24, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_()
    return x, w, b


def test_toy_op_is_listed_with_its_backends(toy_op):
    ops = registered_ops()
    assert ops[NAME] is toy_op and set(toy_op.available) == {"reference", "triton"}
    assert toy_op.resolve("reference", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="no 'compiled' backend"):
        toy_op.resolve("compiled", torch.device("cpu"))
    assert f"op {NAME} on cpu" in fastprompt.env_report(print_report=False)


@needs_triton
def test_harness_on_toy_op(toy_op):
    dtypes = (torch.float64, torch.float32) if INTERPRET else (torch.float32, torch.float16)
    case = OpCase(toy_op, toy_inputs, dtypes={"triton": dtypes},
                  opcheck={"triton": lambda args: [(torch.ops.fastprompt.toy_axpb_triton_fwd.default,
                                                    tuple(a.detach() for a in args))]})
    assert check_op(case, DEVICE) == ["triton"]


@needs_triton
def test_harness_catches_an_unwritten_element(toy_op):
    """A backend that leaves one output element unwritten fails the harness (NaN-poisoned memory)."""

    def broken(x, w, b):
        out = torch.empty_like(x)
        out[:, :-1] = toy_triton(x, w, b)[:, :-1]
        return out

    register_impl(NAME, backend="triton")(broken)
    try:
        with pytest.raises(AssertionError, match="non-finite output"):
            check_op(OpCase(toy_op, toy_inputs, dtypes={"triton": (torch.float32,)}), DEVICE)
    finally:
        register_impl(NAME, backend="triton")(toy_triton)


def condition_inputs(dtype, device, gen):
    def t(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_()

    return t(3, 16), t(8, 16), t(8), t(16, 8), t(16), "relu", 0.01, 1.0


@needs_triton
def test_harness_on_condition():
    from fastprompt.ops.condition import OP

    assert "triton" in usable_backends(OP, DEVICE)
    dtypes = (torch.float64, torch.float32) if INTERPRET else (torch.float32, torch.bfloat16)
    case = OpCase(OP, condition_inputs, dtypes={"triton": dtypes})
    assert check_op(case, DEVICE) == ["triton"]
