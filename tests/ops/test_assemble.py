"""The compiled ``assemble`` op (fastprompt._C, CPU and CUDA) against its eager reference."""
from __future__ import annotations


import pytest
import torch

from fastprompt._extension import extension_has_cuda, extension_loaded, load_error
from fastprompt.ops.assemble import assemble
from fastprompt.ops.assemble.reference import assemble_reference
from tests.ops.assemble_cases import Case, assert_matches, make_inputs, rel_err, run_with_grads  # noqa: F401

needs_ext = pytest.mark.skipif(
    not extension_loaded(),
    reason=f"fastprompt._C is not loaded ({load_error()}); build it with "
    "`python setup.py build_ext --inplace` or `pip install -e .`",
)

# max |compiled - reference| / max |reference| allowed, per dtype
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 3e-2}



def _compiled():
    from fastprompt.ops.assemble.compiled import assemble_compiled

    return assemble_compiled


# ----------------------------------------------------------------------------------------------- inputs

CASES = [
    Case("coop_end", G=1, M=4, D=16, C=7, L=12, N=None, layout="end", shift=False),
    Case("cocoop_end", G=5, M=4, D=16, C=6, L=10, N=None, layout="end", shift=True),
    Case("many_groups_middle", G=40, M=3, D=8, C=3, L=9, N=100, layout="middle", shift=True),
    Case("one_class_front", G=3, M=2, D=12, C=1, L=6, N=7, layout="front", shift=True),
    Case("L1", G=2, M=2, D=8, C=4, L=1, N=9, layout="random", shift=True),
    Case("L35_odd_M", G=3, M=7, D=24, C=5, L=35, N=20, layout="middle", shift=True),
    Case("M1_odd_D", G=2, M=1, D=5, C=4, L=7, N=11, layout="front", shift=False),
    Case("random_repeats_suffix", G=4, M=5, D=32, C=6, L=8, N=50, layout="random", shift=True, pos_offset=9),
    Case("end_truncated", G=2, M=6, D=16, C=3, L=4, N=6, layout="end", shift=False, pos_offset=3),
]


# ----------------------------------------------------------------------------------------------- CPU
@needs_ext
class TestCompiledCPU:
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
    @pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
    def test_matches_reference(self, case, dtype):
        args = make_inputs(case, dtype)
        assert_matches(_compiled(), args, args, TOL[dtype])

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("case", CASES[:4], ids=lambda c: c.name)
    def test_half_types_against_float64(self, case, dtype):
        """Half types accumulate in float32: compare with the float64 reference on the same (rounded) values."""
        args = make_inputs(case, dtype)
        ref_args = [a.detach().double().requires_grad_(a.requires_grad) if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        out, g_ctx, g_shift = run_with_grads(_compiled(), args)
        r_out, r_ctx, r_shift = run_with_grads(assemble_reference, ref_args)
        tol = 4e-3 if dtype == torch.float16 else 2e-2  # a few final roundings only
        assert rel_err(out, r_out) <= tol
        assert rel_err(g_ctx, r_ctx) <= tol
        if r_shift is not None:
            assert rel_err(g_shift, r_shift) <= tol

    def test_mixed_dtypes_and_noncontiguous(self):
        """fixed / pos in another dtype are cast to ctx's dtype (as the reference); strided views are accepted."""
        ctx, shift, fixed, slot, pos, off, g_idx, c_idx = make_inputs(CASES[1], torch.float64, requires_grad=False)
        ctx_t = ctx.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)  # non-contiguous leaf
        assert not ctx_t.is_contiguous()
        shift = shift.clone().requires_grad_(True)
        args = (ctx_t, shift, fixed.float(), slot.t().contiguous().t(), pos.float(), off, g_idx[::1], c_idx)
        assert_matches(_compiled(), args, args, TOL[torch.float64])

    def test_noncontiguous_grad_out(self):
        args = make_inputs(CASES[2], torch.float64)
        out = _compiled()(*args)
        grad = torch.randn(out.shape[0], out.shape[2], dtype=out.dtype)[:, None, :].expand(out.shape)
        got = torch.autograd.grad(out, [args[0], args[1]], grad)
        ref = torch.autograd.grad(assemble_reference(*args), [args[0], args[1]], grad)
        for a, b in zip(got, ref):
            assert rel_err(a, b) <= 1e-10

    def test_grad_only_where_needed(self):
        ctx, shift, *rest = make_inputs(CASES[1], torch.float32)
        shift = shift.detach()
        out = _compiled()(ctx, shift, *rest)
        out.backward(torch.ones_like(out))
        assert ctx.grad is not None and shift.grad is None
        with torch.no_grad():
            assert not _compiled()(ctx, shift, *rest).requires_grad

    def test_empty_pairs(self):
        ctx, shift, fixed, slot, pos, off, g_idx, c_idx = make_inputs(CASES[1], torch.float32)
        out = _compiled()(ctx, shift, fixed, slot, pos, off, g_idx[:0], c_idx[:0])
        assert out.shape == (0, CASES[1].L, CASES[1].D)
        g_ctx, g_shift = torch.autograd.grad(out, [ctx, shift], torch.ones_like(out))
        assert torch.all(g_ctx == 0) and torch.all(g_shift == 0)

    def test_backward_deterministic_across_thread_counts(self):
        args = make_inputs(Case("big", G=3, M=8, D=300, C=50, L=20, N=400, layout="random", shift=True), torch.float32)
        threads = torch.get_num_threads()
        results = []
        try:
            for n in (1, max(2, threads)):
                torch.set_num_threads(n)
                results.append(run_with_grads(_compiled(), args))
        finally:
            torch.set_num_threads(threads)
        for a, b in zip(*results):
            assert torch.equal(a, b)

    @pytest.mark.parametrize("with_shift", [True, False], ids=["shift", "no_shift"])
    def test_opcheck(self, with_shift):
        case = CASES[7] if with_shift else CASES[0]
        args = make_inputs(case, torch.float32)
        torch.library.opcheck(torch.ops.fastprompt.assemble_compiled_fwd.default, args)

    def test_torch_compile(self):
        args = make_inputs(CASES[2], torch.float64)
        compiled_fn = torch.compile(_compiled(), backend="aot_eager", fullgraph=True)
        assert_matches(compiled_fn, args, args, TOL[torch.float64])

    def test_built_with_cuda_is_bool(self):
        assert isinstance(torch.ops.fastprompt.built_with_cuda(), bool)

    # ------------------------------------------------------------------------------------- dispatch
    @pytest.mark.parametrize("backend", ["compiled", "cpu"])
    def test_dispatch(self, backend):
        args = make_inputs(CASES[7], torch.float32)
        assert_matches(lambda *a: assemble(*a, backend=backend), args, args, TOL[torch.float32])

    def test_dispatch_cuda_backend_on_cpu_tensor_errors(self):
        args = make_inputs(CASES[0], torch.float32)
        with pytest.raises(ValueError, match="backend 'cuda'"):
            assemble(*args, backend="cuda")

    # ------------------------------------------------------------------------------------- bad inputs
    BAD = {
        "ctx_not_3d": (lambda a: a.update(ctx=a["ctx"][0]), r"ctx must be \[G, M, D\]"),
        "ctx_int": (lambda a: a.update(ctx=a["ctx"].long()), r"ctx must be float64, float32, float16 or bfloat16"),
        "shift_shape": (lambda a: a.update(shift=a["shift"][:1]), r"shift must be \[G, D\]"),
        "shift_dtype": (lambda a: a.update(shift=a["shift"].float()), r"shift dtype .* differs from ctx dtype"),
        "fixed_D": (lambda a: a.update(fixed=a["fixed"][..., :-1]), r"fixed's last dim"),
        "slot_int32": (lambda a: a.update(slot=a["slot"].int()), r"slot must be int64"),
        "slot_shape": (lambda a: a.update(slot=a["slot"][:, :-1]), r"slot must be \[C, L\]"),
        "pos_D": (lambda a: a.update(pos=a["pos"][:, :-1]), r"pos must be \[P_total, D\]"),
        "pos_offset_high": (lambda a: a.update(pos_offset=a["pos"].shape[0]), r"pos_offset \+ L"),
        "pos_offset_negative": (lambda a: a.update(pos_offset=-1), r"pos_offset \+ L"),
        "g_idx_int32": (lambda a: a.update(g_idx=a["g_idx"].int()), r"g_idx must be int64"),
        "length_mismatch": (lambda a: a.update(c_idx=a["c_idx"][:-1]), r"same length N"),
        "g_idx_range": (lambda a: a["g_idx"].__setitem__(0, 4), r"g_idx has value 4 .* \[0, 4\)"),
        "g_idx_negative": (lambda a: a["g_idx"].__setitem__(1, -1), r"g_idx has value -1"),
        "c_idx_range": (lambda a: a["c_idx"].__setitem__(0, 6), r"c_idx has value 6 .* \[0, 6\)"),
        "slot_range": (lambda a: a["slot"].__setitem__((0, 1), 5), r"slot has value 5 .* < M = 5"),
    }

    @pytest.mark.parametrize("bad", sorted(BAD))
    def test_bad_inputs(self, bad):
        mutate, pattern = self.BAD[bad]
        names = ["ctx", "shift", "fixed", "slot", "pos", "pos_offset", "g_idx", "c_idx"]
        a = dict(zip(names, make_inputs(CASES[7], torch.float64, requires_grad=False)))  # G=4, M=5, C=6
        mutate(a)
        with pytest.raises(RuntimeError, match=pattern):
            _compiled()(*[a[n] for n in names])

    def test_bad_backward_inputs(self):
        ctx, shift, fixed, slot, pos, off, g_idx, c_idx = make_inputs(CASES[7], torch.float64, requires_grad=False)
        grad = torch.randn(len(g_idx), slot.shape[1] + 1, ctx.shape[2], dtype=torch.float64)
        with pytest.raises(RuntimeError, match=r"grad_out .* must be \[N, L, D\]"):
            torch.ops.fastprompt.assemble_compiled_bwd(grad, slot, g_idx, c_idx, ctx.shape[0], ctx.shape[1], True)
        grad = grad[:, :-1]
        with pytest.raises(RuntimeError, match=r"g_idx has value"):
            torch.ops.fastprompt.assemble_compiled_bwd(grad, slot, g_idx, c_idx, 1, ctx.shape[1], True)


# ----------------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@needs_ext
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.skipif(not extension_has_cuda(), reason="fastprompt._C was built without CUDA kernels")
class TestCompiledCUDA:
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
    @pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
    def test_matches_reference(self, case, dtype):
        args = make_inputs(case, dtype, device="cuda")
        assert_matches(_compiled(), args, args, TOL[dtype])

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_matches_cpu_kernel(self, dtype):
        case = Case("big", G=6, M=16, D=512, C=100, L=77, N=600, layout="middle", shift=True)
        cpu_args = make_inputs(case, dtype)
        gpu_args = make_inputs(case, dtype, device="cuda")
        got = run_with_grads(_compiled(), gpu_args)
        ref = run_with_grads(_compiled(), cpu_args)
        for a, b in zip(got, ref):
            assert rel_err(a.cpu(), b) <= (1e-5 if dtype == torch.float32 else 1e-2)

    def test_backward_deterministic(self):
        case = Case("coop", G=1, M=16, D=512, C=1000, L=20, N=None, layout="end", shift=True)
        args = make_inputs(case, torch.float32, device="cuda")
        first, second = run_with_grads(_compiled(), args), run_with_grads(_compiled(), args)
        for a, b in zip(first, second):
            assert torch.equal(a, b)

    @pytest.mark.parametrize("with_shift", [True, False], ids=["shift", "no_shift"])
    def test_opcheck(self, with_shift):
        args = make_inputs(CASES[7] if with_shift else CASES[0], torch.float32, device="cuda")
        torch.library.opcheck(torch.ops.fastprompt.assemble_compiled_fwd.default, args)

    def test_dispatch(self):
        args = make_inputs(CASES[7], torch.float32, device="cuda")
        assert_matches(lambda *a: assemble(*a, backend="cuda"), args, args, TOL[torch.float32])

    def test_mixed_devices_error(self):
        ctx, shift, fixed, slot, pos, off, g_idx, c_idx = make_inputs(CASES[7], torch.float32, device="cuda")
        with pytest.raises(RuntimeError, match="same device"):
            _compiled()(ctx, shift, fixed, slot, pos, off, g_idx.cpu(), c_idx)
