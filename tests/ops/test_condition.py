"""The ``condition`` op (conditioning MLP): dispatch, and the Triton kernels against the eager reference.

Triton runs on the CPU under TRITON_INTERPRET=1 (tiny shapes: every program instance costs milliseconds) and on
CUDA (tests marked ``gpu``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from fastprompt.ops.condition import OP, condition
from fastprompt.ops.condition.reference import condition_reference

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except Exception:  # pragma: no cover - triton is a dependency, but keep the reference tests runnable without it
    HAVE_TRITON = False
needs_interpreter = pytest.mark.skipif(
    not (HAVE_TRITON and INTERPRET),
    reason="Triton on CPU tensors needs TRITON_INTERPRET=1 in the environment before triton is imported "
    "(tests/conftest.py sets it when no CUDA device is present)",
)

# max |triton - reference| / max |reference| allowed, per dtype
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 3e-2}
NAMES = ("x", "w1", "b1", "w2", "b2")


def _mod():
    import fastprompt.ops.condition.triton_impl as mod

    return mod


def _triton(*args):
    return _mod().condition_triton(*args)


# ----------------------------------------------------------------------------------------------- inputs
@dataclass
class Case:
    name: str
    B: int
    Din: int
    Dh: int
    Dout: int  # ignored when two_layer is False
    activation: str = "relu"
    b1: bool = True
    b2: bool = True
    two_layer: bool = True
    scale: float = 1.0
    slope: float = 0.01


CASES = [
    Case("cocoop_small", B=4, Din=48, Dh=8, Dout=48),  # CoCoOp: relu, Din -> Din / 16 -> Din
    Case("B1_hidden1_leaky_scaled", B=1, Din=17, Dh=1, Dout=9, activation="leaky_relu", scale=2.5, slope=0.2),
    Case("hidden32_none_nobias", B=5, Din=40, Dh=32, Dout=24, activation="none", b1=False, b2=False),
    Case("capt_multi_block", B=19, Din=70, Dh=32, Dout=130, activation="leaky_relu", scale=3.0, slope=0.1),
    Case("b1_only", B=3, Din=20, Dh=12, Dout=7, b2=False),
    Case("b2_only_relu", B=6, Din=9, Dh=5, Dout=33, b1=False),
    Case("hidden130_chunks", B=3, Din=20, Dh=130, Dout=20),  # hidden layer in several chunks (beyond 128)
    Case("one_layer", B=7, Din=30, Dh=100, Dout=0, two_layer=False, scale=0.5),  # SoftCPT-style linear
    Case("one_layer_nobias", B=3, Din=33, Dh=20, Dout=0, two_layer=False, b1=False),
]
BY_NAME = {c.name: c for c in CASES}


def make_inputs(case: Case, dtype=torch.float32, device="cpu", seed=0, requires_grad=True):
    """(x, w1, b1, w2, b2, activation, negative_slope, scale); weights at nn.Linear-like scale."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype).to(device)

    x = randn(case.B, case.Din)
    w1 = randn(case.Dh, case.Din, std=case.Din**-0.5)
    b1 = randn(case.Dh, std=0.5) if case.b1 else None
    w2 = randn(case.Dout, case.Dh, std=case.Dh**-0.5) if case.two_layer else None
    b2 = randn(case.Dout, std=0.5) if (case.two_layer and case.b2) else None
    if requires_grad:
        for t in (x, w1, b1, w2, b2):
            if t is not None:
                t.requires_grad_(True)
    return x, w1, b1, w2, b2, case.activation, case.slope, case.scale


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if b.numel() == 0:
        return 0.0
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def run_with_grads(fn, args, grad_out_seed=1, grad_out=None):
    """out and {name: grad} of every input that requires grad, for a random upstream gradient."""
    out = fn(*args)
    if grad_out is None:
        gen = torch.Generator().manual_seed(grad_out_seed)
        grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype).to(out.device)
    wrt = {n: t for n, t in zip(NAMES, args[:5]) if t is not None and t.requires_grad}
    grads = torch.autograd.grad(out, list(wrt.values()), grad_out) if wrt else ()
    return out, dict(zip(wrt, grads))


def assert_matches(fn, args, ref_args, tol, grad_out=None):
    out, grads = run_with_grads(fn, args, grad_out=grad_out)
    r_out, r_grads = run_with_grads(condition_reference, ref_args, grad_out=grad_out)
    assert out.dtype == r_out.dtype and out.shape == r_out.shape
    assert not torch.isnan(out).any(), "output has NaN"
    assert rel_err(out, r_out) <= tol, f"forward rel err {rel_err(out, r_out)}"
    assert grads.keys() == r_grads.keys()
    for name, g in grads.items():
        assert g.dtype == r_grads[name].dtype and g.shape == r_grads[name].shape, name
        assert not torch.isnan(g).any(), f"grad_{name} has NaN"
        assert rel_err(g, r_grads[name]) <= tol, f"grad_{name} rel err {rel_err(g, r_grads[name])}"


@pytest.fixture
def nan_buffers(monkeypatch):
    """Every buffer the kernels allocate starts as NaN: an element they forget to write shows."""

    def full_nan(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(_mod(), "_empty", full_nan)


# ----------------------------------------------------------------------------------------------- dispatch (no Triton)
class TestDispatch:
    def test_reference_backend(self):
        args = make_inputs(CASES[0])
        assert torch.equal(condition(*args, backend="reference"), condition_reference(*args))

    def test_auto_on_cpu_is_reference(self):
        assert OP.resolve("auto", torch.device("cpu")) == "reference"

    def test_missing_backend(self):
        args = make_inputs(CASES[0])
        with pytest.raises(ValueError, match="no 'compiled' backend"):
            condition(*args, backend="compiled")
        assert torch.equal(condition(*args, backend="compiled", strict=False), condition_reference(*args))

    @pytest.mark.skipif(INTERPRET or torch.cuda.is_available(), reason="triton is usable here")
    def test_triton_unavailable_says_why(self):
        args = make_inputs(CASES[0])
        with pytest.raises(RuntimeError, match="backend 'triton' is not available"):
            condition(*args, backend="triton")

    def test_bad_activation(self):
        x, w1, b1, w2, b2, _, slope, scale = make_inputs(CASES[0])
        with pytest.raises(ValueError, match="activation must be one of"):
            condition(x, w1, b1, w2, b2, "gelu", backend="reference")


# ----------------------------------------------------------------------------------------------- CPU (interpreter)
@needs_interpreter
class TestTritonInterpreter:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    @pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
    def test_matches_reference(self, case, dtype, nan_buffers):
        args = make_inputs(case, dtype)
        assert_matches(_triton, args, args, TOL[dtype])

    @pytest.mark.parametrize("name", ["capt_multi_block", "one_layer"])
    def test_float64(self, name):
        """float64 inputs accumulate in float64 (a float32 path would miss 1e-10)."""
        args = make_inputs(BY_NAME[name], torch.float64)
        assert_matches(_triton, args, args, TOL[torch.float64])

    @pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
    def test_activation_derivative_at_zero(self, activation):
        """Pre-activations exactly 0 (zero input row, zero bias): derivative as torch's (h > 0 strictly)."""
        case = Case("zeros", B=4, Din=12, Dh=6, Dout=5, activation=activation, slope=0.3)
        x, w1, b1, w2, b2, act, slope, scale = make_inputs(case, requires_grad=False)
        x[1] = 0.0
        b1[::2] = 0.0
        args = [t.requires_grad_(True) for t in (x, w1, b1, w2, b2)] + [act, slope, scale]
        assert_matches(_triton, args, args, TOL[torch.float32])

    def test_backward_deterministic(self):
        args = make_inputs(BY_NAME["capt_multi_block"])
        (o1, g1), (o2, g2) = run_with_grads(_triton, args), run_with_grads(_triton, args)
        assert torch.equal(o1, o2)
        for name in g1:
            assert torch.equal(g1[name], g2[name]), name

    def test_frozen_input(self):
        """CoCoOp's x (image features) is frozen: only the parameters get gradients."""
        x, *rest = make_inputs(BY_NAME["cocoop_small"])
        args = (x.detach(), *rest)
        out, grads = run_with_grads(_triton, args)
        assert set(grads) == {"w1", "b1", "w2", "b2"}
        assert_matches(_triton, args, args, TOL[torch.float32])
        with torch.no_grad():
            assert not _triton(*args).requires_grad

    def test_noncontiguous(self):
        """Strided x / weights (transposed storage) and an expanded upstream gradient."""
        case = BY_NAME["capt_multi_block"]
        x, w1, b1, w2, b2, act, slope, scale = make_inputs(case, requires_grad=False)
        x = x.t().contiguous().t().requires_grad_(True)
        w1 = w1.t().contiguous().t().requires_grad_(True)
        w2 = w2.t().contiguous().t().requires_grad_(True)
        assert not (x.is_contiguous() or w1.is_contiguous() or w2.is_contiguous())
        args = (x, w1, b1.requires_grad_(True), w2, b2.requires_grad_(True), act, slope, scale)
        grad_out = torch.randn(1, case.Dout).expand(case.B, case.Dout)  # stride 0 over rows
        assert_matches(_triton, args, args, TOL[torch.float32], grad_out=grad_out)

    def test_one_layer_ignores_b2(self):
        """As the reference: with w2 None, b2 (and the activation) are unused."""
        x, w1, b1, _, _, _, _, _ = make_inputs(BY_NAME["one_layer"])
        b2 = torch.randn(5)
        args = (x, w1, b1, None, b2, "relu", 0.01, 0.5)
        assert_matches(_triton, args, args, TOL[torch.float32])

    def test_empty_batch(self):
        x, w1, b1, w2, b2, act, slope, scale = make_inputs(BY_NAME["cocoop_small"])
        out = _triton(x[:0], w1, b1, w2, b2, act, slope, scale)
        assert out.shape == (0, w2.shape[0])
        grads = torch.autograd.grad(out, [w1, b1, w2, b2], torch.ones_like(out))
        assert all(torch.all(g == 0) for g in grads)

    @pytest.mark.parametrize("name", ["cocoop_small", "one_layer_nobias"])
    def test_opcheck(self, name):
        """schema, autograd registration, fake tensor and aot_dispatch_dynamic (< 2 s each here)."""
        args = make_inputs(BY_NAME[name])
        torch.library.opcheck(torch.ops.fastprompt.condition_triton_fwd.default, args)

    def test_opcheck_backward_op(self):
        x, w1, b1, w2, b2, act, slope, scale = make_inputs(BY_NAME["capt_multi_block"], requires_grad=False)
        hidden = torch.randn(x.shape[0], w1.shape[0])
        grad_out = torch.randn(x.shape[0], w2.shape[0])
        args = (grad_out, x, w1, w2, hidden, act, slope, scale, True, True)
        torch.library.opcheck(torch.ops.fastprompt.condition_triton_bwd.default, args)

    def test_torch_compile(self):
        args = make_inputs(BY_NAME["capt_multi_block"])
        compiled_fn = torch.compile(_triton, backend="aot_eager", fullgraph=True)
        assert_matches(compiled_fn, args, args, TOL[torch.float32])

    def test_dispatch(self):
        args = make_inputs(BY_NAME["capt_multi_block"])
        assert_matches(lambda *a: condition(*a, backend="triton"), args, args, TOL[torch.float32])

    def test_bad_inputs(self):
        x, w1, b1, w2, b2, act, slope, scale = make_inputs(BY_NAME["cocoop_small"], requires_grad=False)
        with pytest.raises(RuntimeError, match=r"w1 must be \[Dh, Din = 48\]"):
            _triton(x, w1[:, :-1], b1, w2, b2)
        with pytest.raises(RuntimeError, match=r"w2 must be \[Dout, Dh = 8\]"):
            _triton(x, w1, b1, w2[:, :-1], b2)
        with pytest.raises(RuntimeError, match=r"b2 must be \[48\]"):
            _triton(x, w1, b1, w2, b2[:-1])
        with pytest.raises(RuntimeError, match="w2 dtype torch.float64 differs from x dtype torch.float32"):
            _triton(x, w1, b1, w2.double(), b2)
        with pytest.raises(ValueError, match="activation must be one of"):
            _triton(x, w1, b1, w2, b2, "tanh")


# ----------------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
class TestTritonCUDA:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    @pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
    def test_matches_reference(self, case, dtype, nan_buffers):
        args = make_inputs(case, dtype, device="cuda")  # (torch's float32 GEMMs do not use TF32 by default)
        assert_matches(_triton, args, args, TOL[dtype])

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("name", ["cocoop_small", "capt_multi_block", "one_layer"])
    def test_half_types_against_float64(self, name, dtype):
        """Half types accumulate in float32: compare with the float64 reference on the same (rounded) values."""
        args = make_inputs(BY_NAME[name], dtype, device="cuda")
        ref_args = [
            a.detach().double().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a for a in args
        ]
        out, grads = run_with_grads(_triton, args)
        r_out, r_grads = run_with_grads(condition_reference, ref_args)
        tol = 1e-2 if dtype == torch.float16 else 3e-2  # input / output roundings only
        assert rel_err(out, r_out) <= tol
        for name_, g in grads.items():
            assert rel_err(g, r_grads[name_]) <= tol, name_

    def test_cocoop_shape(self):
        """The real CoCoOp meta-net (B = 32, 512 -> 32 -> 512) in float32: exact to 1e-5, deterministic."""
        case = Case("cocoop", B=32, Din=512, Dh=32, Dout=512)
        args = make_inputs(case, torch.float32, device="cuda")
        assert_matches(_triton, args, args, 1e-5)
        (o1, g1), (o2, g2) = run_with_grads(_triton, args), run_with_grads(_triton, args)
        assert torch.equal(o1, o2) and all(torch.equal(g1[n], g2[n]) for n in g1)

    def test_auto_prefers_triton(self):
        assert OP.resolve("auto", torch.device("cuda")) == "triton"

    def test_torch_compile_inductor(self):
        args = make_inputs(BY_NAME["capt_multi_block"], device="cuda")
        compiled_fn = torch.compile(_triton, fullgraph=True)
        assert_matches(compiled_fn, args, args, TOL[torch.float32])
