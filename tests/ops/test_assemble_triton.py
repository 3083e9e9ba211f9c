"""The Triton ``assemble`` op against its eager reference (CPU under TRITON_INTERPRET=1, and CUDA).

Shapes are tiny: under the interpreter every program instance costs milliseconds.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from fastprompt.ops.assemble import OP, assemble  # noqa: E402
from fastprompt.ops.assemble.reference import assemble_reference  # noqa: E402
from tests.ops.assemble_cases import Case, assert_matches, rel_err, run_with_grads  # noqa: E402,F401
from tests.ops.assemble_cases import make_inputs as _make_inputs  # noqa: E402


def make_inputs(case: Case, dtype=torch.float32, **kwargs):
    return _make_inputs(case, dtype, **kwargs)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_interpreter = pytest.mark.skipif(
    not INTERPRET,
    reason="Triton on CPU tensors needs TRITON_INTERPRET=1 in the environment before triton is imported "
    "(tests/conftest.py sets it when no CUDA device is present)",
)

# max |triton - reference| / max |reference| allowed, per dtype
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 3e-2}


def _mod():
    import fastprompt.ops.assemble.triton_impl as mod

    return mod


def _triton(*args):
    return _mod().assemble_triton(*args)


# ----------------------------------------------------------------------------------------------- inputs

CASES = [
    Case("coop_end", G=1, M=4, D=16, C=5, L=8, N=None, layout="end", shift=False),
    Case("cocoop_end", G=3, M=4, D=16, C=4, L=10, N=None, layout="end", shift=True),
    Case("many_groups_middle", G=20, M=3, D=8, C=3, L=6, N=40, layout="middle", shift=True),
    Case("one_class_front", G=3, M=2, D=12, C=1, L=6, N=7, layout="front", shift=True),
    Case("L1", G=2, M=2, D=8, C=4, L=1, N=9, layout="random", shift=True),
    Case("L33_odd_M", G=3, M=7, D=24, C=3, L=33, N=6, layout="middle", shift=True),
    Case("M1_odd_D_no_shift", G=2, M=1, D=5, C=4, L=7, N=11, layout="front", shift=False),
    Case("random_repeats_suffix", G=4, M=5, D=32, C=6, L=8, N=30, layout="random", shift=True, pos_offset=9),
    Case("wide_D", G=2, M=3, D=300, C=2, L=5, N=4, layout="end", shift=True, pos_offset=2),
]
BY_NAME = {c.name: c for c in CASES}


@pytest.fixture
def nan_buffers(monkeypatch):
    """Every buffer the kernels allocate starts as NaN: an element they forget to write shows."""

    def full_nan(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(_mod(), "_empty", full_nan)


# ----------------------------------------------------------------------------------------------- CPU (interpreter)
@needs_interpreter
class TestTritonInterpreter:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    @pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
    def test_matches_reference(self, case, dtype, nan_buffers):
        args = make_inputs(case, dtype)
        assert_matches(_triton, args, args, TOL[dtype])

    @pytest.mark.parametrize("name", ["cocoop_end", "random_repeats_suffix"])
    def test_float64(self, name):
        """float64 inputs accumulate in float64 (a float32 path would miss 1e-10)."""
        args = make_inputs(BY_NAME[name], torch.float64)
        assert_matches(_triton, args, args, TOL[torch.float64])

    @pytest.mark.parametrize("chunk", [1, 3])
    @pytest.mark.parametrize("name", ["coop_end", "many_groups_middle", "random_repeats_suffix"])
    def test_multi_chunk_backward(self, name, chunk, monkeypatch, nan_buffers):
        """Groups split over several chunks (pass 2 sums partials); unused launch slots are never read."""
        monkeypatch.setattr(_mod(), "PAIRS_PER_CHUNK", chunk)
        args = make_inputs(BY_NAME[name], torch.float32)
        assert_matches(_triton, args, args, TOL[torch.float32])

    def test_groups_without_pairs(self, nan_buffers):
        """Groups no pair uses get exact zero gradients (not the NaN of an unwritten buffer)."""
        ctx, shift, fixed, slot, pos, off, g_idx, c_idx = make_inputs(BY_NAME["random_repeats_suffix"])
        g_idx = g_idx.clamp(max=1)  # groups 2, 3 unused
        args = (ctx, shift, fixed, slot, pos, off, g_idx, c_idx)
        assert_matches(_triton, args, args, TOL[torch.float32])
        _, g_ctx, g_shift = run_with_grads(_triton, args)
        assert torch.all(g_ctx[2:] == 0) and torch.all(g_shift[2:] == 0)

    def test_backward_deterministic(self, monkeypatch):
        monkeypatch.setattr(_mod(), "PAIRS_PER_CHUNK", 4)
        args = make_inputs(BY_NAME["random_repeats_suffix"], torch.float32)
        first, second = run_with_grads(_triton, args), run_with_grads(_triton, args)
        for a, b in zip(first, second):
            assert torch.equal(a, b)

    def test_mixed_dtypes_and_noncontiguous(self):
        """fixed / pos / shift in other dtypes round to ctx's dtype where the reference casts; strided views work."""
        ctx, shift, fixed, slot, pos, off, g_idx, c_idx = make_inputs(BY_NAME["cocoop_end"], requires_grad=False)
        ctx_t = ctx.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)  # non-contiguous leaf
        assert not ctx_t.is_contiguous()
        shift64 = shift.double().requires_grad_(True)
        args = (ctx_t, shift64, fixed.double(), slot.t().contiguous().t(), pos.half(), off, g_idx.flip(0), c_idx)
        assert_matches(_triton, args, args, TOL[torch.float32])

    def test_noncontiguous_grad_out(self):
        args = make_inputs(BY_NAME["many_groups_middle"], torch.float32)
        out = _triton(*args)
        grad = torch.randn(out.shape[0], out.shape[2])[:, None, :].expand(out.shape)  # stride 0 over L
        got = torch.autograd.grad(out, [args[0], args[1]], grad)
        ref = torch.autograd.grad(assemble_reference(*args), [args[0], args[1]], grad)
        for a, b in zip(got, ref):
            assert rel_err(a, b) <= TOL[torch.float32]

    def test_grad_only_where_needed(self):
        ctx, shift, *rest = make_inputs(BY_NAME["cocoop_end"])
        shift = shift.detach()
        out = _triton(ctx, shift, *rest)
        out.backward(torch.ones_like(out))
        assert ctx.grad is not None and shift.grad is None
        with torch.no_grad():
            assert not _triton(ctx, shift, *rest).requires_grad

    def test_empty_pairs(self):
        case = BY_NAME["cocoop_end"]
        ctx, shift, fixed, slot, pos, off, g_idx, c_idx = make_inputs(case)
        out = _triton(ctx, shift, fixed, slot, pos, off, g_idx[:0], c_idx[:0])
        assert out.shape == (0, case.L, case.D)
        g_ctx, g_shift = torch.autograd.grad(out, [ctx, shift], torch.ones_like(out))
        assert torch.all(g_ctx == 0) and torch.all(g_shift == 0)

    @pytest.mark.parametrize("with_shift", [True, False], ids=["shift", "no_shift"])
    def test_opcheck(self, with_shift):
        """schema, autograd registration, fake tensor and aot_dispatch_dynamic (~1-6 s each here)."""
        case = BY_NAME["cocoop_end"] if with_shift else BY_NAME["M1_odd_D_no_shift"]
        args = make_inputs(case)
        torch.library.opcheck(torch.ops.fastprompt.assemble_triton_fwd.default, args)

    def test_opcheck_backward_op(self):
        ctx, shift, fixed, slot, pos, off, g_idx, c_idx = make_inputs(BY_NAME["cocoop_end"], requires_grad=False)
        grad_out = torch.randn(g_idx.shape[0], slot.shape[1], ctx.shape[2])
        G, M = ctx.shape[:2]
        args = (grad_out, slot, g_idx, c_idx, G, M, True)
        torch.library.opcheck(torch.ops.fastprompt.assemble_triton_bwd.default, args)

    def test_torch_compile(self):
        args = make_inputs(BY_NAME["many_groups_middle"])
        compiled_fn = torch.compile(_triton, backend="aot_eager", fullgraph=True)
        assert_matches(compiled_fn, args, args, TOL[torch.float32])

    def test_dispatch(self):
        args = make_inputs(BY_NAME["random_repeats_suffix"])
        assert_matches(lambda *a: assemble(*a, backend="triton"), args, args, TOL[torch.float32])
        assert OP.resolve("auto", torch.device("cpu")) != "triton"  # never the interpreter by default

    BAD = {
        "ctx_not_3d": (lambda a: a.update(ctx=a["ctx"][0]), r"ctx must be \[G, M, D\]"),
        "ctx_int": (lambda a: a.update(ctx=a["ctx"].long()), r"ctx must be float64, float32, float16 or bfloat16"),
        "shift_shape": (lambda a: a.update(shift=a["shift"][:1]), r"shift must be \[G, D\]"),
        "fixed_D": (lambda a: a.update(fixed=a["fixed"][..., :-1]), r"fixed must be \[C, L, D\]"),
        "slot_int32": (lambda a: a.update(slot=a["slot"].int()), r"slot must be int64"),
        "pos_offset_high": (lambda a: a.update(pos_offset=a["pos"].shape[0]), r"pos_offset \+ L"),
        "length_mismatch": (lambda a: a.update(c_idx=a["c_idx"][:-1]), r"same length N"),
        "g_idx_range": (lambda a: a["g_idx"].__setitem__(0, 4), r"g_idx has value 4 .* \[0, 4\)"),
        "c_idx_negative": (lambda a: a["c_idx"].__setitem__(1, -1), r"c_idx has value -1"),
        "slot_range": (lambda a: a["slot"].__setitem__((0, 1), 5), r"slot has value 5 .* < M = 5"),
    }

    @pytest.mark.parametrize("bad", sorted(BAD))
    def test_bad_inputs(self, bad):
        mutate, pattern = self.BAD[bad]
        names = ["ctx", "shift", "fixed", "slot", "pos", "pos_offset", "g_idx", "c_idx"]
        a = dict(zip(names, make_inputs(BY_NAME["random_repeats_suffix"], requires_grad=False)))  # G=4, M=5, C=6
        mutate(a)
        with pytest.raises(RuntimeError, match=pattern):
            _triton(*[a[n] for n in names])


# ----------------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
class TestTritonCUDA:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    @pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
    def test_matches_reference(self, case, dtype, nan_buffers):
        args = make_inputs(case, dtype, device="cuda")
        assert_matches(_triton, args, args, TOL[dtype])

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("name", ["coop_end", "cocoop_end", "random_repeats_suffix"])
    def test_half_types_against_float64(self, name, dtype):
        """Half types accumulate in float32: compare with the float64 reference on the same (rounded) values."""
        args = make_inputs(BY_NAME[name], dtype, device="cuda")
        ref_args = [
            a.detach().double().requires_grad_(a.requires_grad) if torch.is_tensor(a) and a.is_floating_point() else a
            for a in args
        ]
        out, g_ctx, g_shift = run_with_grads(_triton, args)
        r_out, r_ctx, r_shift = run_with_grads(assemble_reference, ref_args)
        tol = 4e-3 if dtype == torch.float16 else 2e-2  # a few final roundings only
        assert rel_err(out, r_out) <= tol
        assert rel_err(g_ctx, r_ctx) <= tol
        if r_shift is not None:
            assert rel_err(g_shift, r_shift) <= tol

    def test_large_coop_deterministic(self):
        """CoOp at scale (G = 1, 1000 classes): many chunks, bitwise reproducible, matches the reference."""
        case = Case("coop_big", G=1, M=16, D=512, C=1000, L=77, N=None, layout="end", shift=True)
        args = make_inputs(case, torch.float32, device="cuda")
        first, second = run_with_grads(_triton, args), run_with_grads(_triton, args)
        for a, b in zip(first, second):
            assert torch.equal(a, b)
        assert_matches(_triton, args, args, 1e-5)

    def test_torch_compile_inductor(self):
        args = make_inputs(BY_NAME["many_groups_middle"], device="cuda")
        compiled_fn = torch.compile(_triton, fullgraph=True)
        assert_matches(compiled_fn, args, args, TOL[torch.float32])

    def test_dispatch(self):
        args = make_inputs(BY_NAME["random_repeats_suffix"], device="cuda")
        assert_matches(lambda *a: assemble(*a, backend="triton"), args, args, TOL[torch.float32])

    def test_mixed_devices_error(self):
        ctx, shift, fixed, slot, pos, off, g_idx, c_idx = make_inputs(BY_NAME["cocoop_end"], device="cuda")
        with pytest.raises(RuntimeError, match="same device"):
            _triton(ctx, shift, fixed, slot, pos, off, g_idx.cpu(), c_idx)
