"""The ``pool_project`` backends (compiled CPU / CUDA, Triton) against the eager reference.

The Triton tests run on CUDA, or on the CPU under ``TRITON_INTERPRET=1`` (set in the environment before the
test process starts, since the kernels read it when they are decorated); otherwise they are skipped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from fastprompt._extension import extension_has_cuda, extension_loaded, load_error
from fastprompt.ops.pool_project import OP, pool_project
from fastprompt.ops.pool_project.reference import pool_project_reference

needs_ext = pytest.mark.skipif(
    not extension_loaded(),
    reason=f"fastprompt._C is not loaded ({load_error()}); build it with "
    "`python setup.py build_ext --inplace` or `pip install -e .`",
)

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_triton_ok, _triton_why = OP.available["triton"](torch.device(TRITON_DEVICE))
needs_triton = pytest.mark.skipif(
    not _triton_ok,
    reason=f"Triton backend unavailable ({_triton_why}); run with TRITON_INTERPRET=1 to test it on the CPU",
)

# max |backend - reference| / max |reference| allowed, per dtype
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 3e-2}



def _compiled():
    from fastprompt.ops.pool_project.compiled import pool_project_compiled

    return pool_project_compiled


def _triton():
    from fastprompt.ops.pool_project.triton_impl import pool_project_triton

    return pool_project_triton


# ----------------------------------------------------------------------------------------------- inputs
@dataclass
class Case:
    name: str
    T: int
    W: int
    E: Optional[int]  # None: no projection
    rows: str  # none | repeats | one | empty
    affine: str  # both | weight | bias | none
    normalize: bool
    const_row: bool = False  # one gathered row of x is constant (zero variance)


CASES = [
    Case("all_rows", T=7, W=16, E=12, rows="none", affine="both", normalize=True),
    Case("repeats", T=9, W=16, E=8, rows="repeats", affine="both", normalize=True),
    Case("one_row", T=5, W=16, E=8, rows="one", affine="both", normalize=True),
    Case("no_affine_plain", T=6, W=12, E=10, rows="repeats", affine="none", normalize=False),
    Case("no_proj_norm", T=6, W=16, E=None, rows="repeats", affine="weight", normalize=True),
    Case("no_proj_plain", T=5, W=8, E=None, rows="none", affine="bias", normalize=False),
    Case("odd_widths", T=8, W=33, E=7, rows="repeats", affine="both", normalize=True, const_row=True),
    Case("proj_plain", T=6, W=24, E=16, rows="none", affine="both", normalize=False),
]
TRITON_CASES = [c for c in CASES if c.name in ("all_rows", "repeats", "one_row", "no_affine_plain", "no_proj_norm", "odd_widths")]


def make_inputs(case: Case, dtype=torch.float64, device="cpu", seed=0, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(dtype)

    x = randn(case.T, case.W, scale=2.0, shift=0.5)
    if case.rows == "none":
        rows = None
    elif case.rows == "one":
        rows = torch.tensor([case.T - 2])
    elif case.rows == "empty":
        rows = torch.zeros(0, dtype=torch.int64)
    else:  # random order, repeats guaranteed, row 0 never gathered
        rows = torch.randint(1, case.T, (case.T + 3,), generator=gen)
        rows[-2:] = rows[:2]
    if case.const_row:
        r = 0 if rows is None else int(rows[0])
        x[r] = 1.25
    w = randn(case.W, scale=0.2, shift=1.0) if case.affine in ("both", "weight") else None
    b = randn(case.W, scale=0.3) if case.affine in ("both", "bias") else None
    proj = randn(case.W, case.E, scale=case.W**-0.5) if case.E is not None else None
    x = x.to(device)
    rows, w, b, proj = [t.to(device) if t is not None else None for t in (rows, w, b, proj)]
    if requires_grad:
        x.requires_grad_(True)
    return x, rows, w, b, 1e-5, proj, case.normalize


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if b.numel() == 0:
        return 0.0
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def run_with_grad(fn, args, grad_seed=1):
    """out and grad_x for a random upstream gradient."""
    x = args[0]
    out = fn(*args)
    gen = torch.Generator().manual_seed(grad_seed)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype).to(out.device)
    (grad_x,) = torch.autograd.grad(out, [x], grad_out)
    return out, grad_x


def assert_matches(fn, args, ref_args, tol):
    out, gx = run_with_grad(fn, args)
    r_out, r_gx = run_with_grad(pool_project_reference, ref_args)
    assert out.dtype == r_out.dtype and out.shape == r_out.shape and out.device == r_out.device
    assert gx.dtype == r_gx.dtype and gx.shape == r_gx.shape == args[0].shape
    assert not torch.isnan(out).any() and not torch.isnan(gx).any()
    assert rel_err(out, r_out) <= tol, f"forward rel err {rel_err(out, r_out)}"
    assert rel_err(gx, r_gx) <= tol, f"grad_x rel err {rel_err(gx, r_gx)}"
    rows = args[1]
    if rows is not None:  # rows never gathered get exactly zero
        unused = torch.ones(args[0].shape[0], dtype=torch.bool)
        unused[rows.cpu()] = False
        assert torch.all(gx.cpu()[unused] == 0)


def _as_double(args):
    return [a.detach().double().requires_grad_(a.requires_grad) if torch.is_tensor(a) and a.is_floating_point() else a for a in args]


class _PoisonedEmpty:
    """Every uninitialised allocation (torch.empty / at::empty, from Python or C++) filled with NaN while active.

    Deterministic mode fills new memory; warn_only keeps ops without a deterministic variant (cuBLAS without
    CUBLAS_WORKSPACE_CONFIG) running.
    """

    def __enter__(self):
        self._det = torch.are_deterministic_algorithms_enabled()
        self._warn = torch.is_deterministic_algorithms_warn_only_enabled()
        self._fill = torch.utils.deterministic.fill_uninitialized_memory
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = True
        return self

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self._det, warn_only=self._warn)
        torch.utils.deterministic.fill_uninitialized_memory = self._fill


def test_poisoned_empty_fills_nan():
    with _PoisonedEmpty():
        assert torch.isnan(torch.empty(4)).all()


# ----------------------------------------------------------------------------------------------- compiled CPU
@needs_ext
class TestCompiledCPU:
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
    @pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
    def test_matches_reference(self, case, dtype):
        args = make_inputs(case, dtype)
        assert_matches(_compiled(), args, args, TOL[dtype])

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("case", CASES[:5], ids=lambda c: c.name)
    def test_half_types_against_float64(self, case, dtype):
        """Half types compute in float32: compare with the float64 reference on the same (rounded) values."""
        args = make_inputs(case, dtype)
        out, gx = run_with_grad(_compiled(), args)
        r_out, r_gx = run_with_grad(pool_project_reference, _as_double(args))
        tol = 4e-3 if dtype == torch.float16 else 2e-2  # final roundings only
        assert rel_err(out, r_out) <= tol
        assert rel_err(gx, r_gx) <= tol

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
    def test_zero_norm_row(self, dtype):
        """A constant row without LayerNorm affine projects to 0: normalize clamps the norm to eps."""
        case = Case("zero", T=5, W=8, E=None, rows="repeats", affine="none", normalize=True, const_row=True)
        args = make_inputs(case, dtype)
        out = _compiled()(*args)
        assert torch.all(out[0] == 0)
        assert_matches(_compiled(), args, args, TOL[dtype])

    @pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=lambda c: c.name)
    def test_nan_poisoned_allocations(self, case):
        """Every output and gradient element is written (unwritten memory would show as NaN)."""
        args = make_inputs(case, torch.float32)
        with _PoisonedEmpty():
            assert_matches(_compiled(), args, args, TOL[torch.float32])

    def test_noncontiguous_inputs(self):
        x, rows, w, b, eps, proj, norm = make_inputs(CASES[1], torch.float64, requires_grad=False)
        x_t = x.t().contiguous().t().requires_grad_(True)  # non-contiguous leaf
        assert not x_t.is_contiguous()
        rows_s = torch.stack([rows, rows], 1)[:, 0]
        proj_t = proj.t().contiguous().t()
        args = (x_t, rows_s, w, b, eps, proj_t, norm)
        assert_matches(_compiled(), args, args, TOL[torch.float64])

    def test_noncontiguous_grad_out(self):
        args = make_inputs(CASES[1], torch.float64)
        out = _compiled()(*args)
        grad = torch.randn(out.shape[1], dtype=out.dtype).expand(out.shape)
        got = torch.autograd.grad(out, [args[0]], grad)[0]
        ref = torch.autograd.grad(pool_project_reference(*args), [args[0]], grad)[0]
        assert rel_err(got, ref) <= 1e-10

    def test_grad_only_for_x(self):
        x, rows, w, b, eps, proj, norm = make_inputs(CASES[1], torch.float32)
        w, b, proj = (t.clone().requires_grad_(True) for t in (w, b, proj))
        out = _compiled()(x, rows, w, b, eps, proj, norm)
        out.backward(torch.ones_like(out))
        assert x.grad is not None and w.grad is None and b.grad is None and proj.grad is None
        with torch.no_grad():
            assert not _compiled()(x, rows, w, b, eps, proj, norm).requires_grad

    def test_empty_rows(self):
        case = Case("empty", T=5, W=8, E=6, rows="empty", affine="both", normalize=True)
        args = make_inputs(case, torch.float32)
        out = _compiled()(*args)
        assert out.shape == (0, 6)
        (gx,) = torch.autograd.grad(out, [args[0]], torch.ones_like(out))
        assert gx.shape == args[0].shape and torch.all(gx == 0)

    def test_deterministic_across_thread_counts(self):
        case = Case("big", T=300, W=64, E=32, rows="repeats", affine="both", normalize=True)
        args = make_inputs(case, torch.float32)
        args = (args[0], torch.randint(0, 300, (900,), generator=torch.Generator().manual_seed(3)), *args[2:])
        threads = torch.get_num_threads()
        results = []
        try:
            for n in (1, max(2, threads)):
                torch.set_num_threads(n)
                results.append(run_with_grad(_compiled(), args))
        finally:
            torch.set_num_threads(threads)
        for a, b in zip(*results):
            assert torch.equal(a, b)

    @pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4], CASES[5]], ids=lambda c: c.name)
    def test_opcheck(self, case):
        args = make_inputs(case, torch.float32)
        torch.library.opcheck(torch.ops.fastprompt.pool_project_compiled_fwd.default, args)

    def test_torch_compile(self):
        args = make_inputs(CASES[1], torch.float64)
        compiled_fn = torch.compile(_compiled(), backend="aot_eager", fullgraph=True)
        assert_matches(compiled_fn, args, args, TOL[torch.float64])

    # ------------------------------------------------------------------------------------- dispatch
    @pytest.mark.parametrize("backend", ["compiled", "cpu", "auto"])
    def test_dispatch(self, backend):
        args = make_inputs(CASES[1], torch.float32)
        assert OP.resolve(backend, torch.device("cpu")) == "compiled"
        assert_matches(lambda *a: pool_project(*a, backend=backend), args, args, TOL[torch.float32])

    def test_dispatch_reference_and_errors(self):
        args = make_inputs(CASES[0], torch.float32)
        out = pool_project(*args, backend="reference")
        assert torch.equal(out, pool_project_reference(*args))
        with pytest.raises(ValueError, match="backend 'cuda'"):
            pool_project(*args, backend="cuda")

    # ------------------------------------------------------------------------------------- bad inputs
    BAD = {
        "x_1d": (lambda a: a.update(x=a["x"][0]), r"x must be \[T, W\]"),
        "x_int": (lambda a: a.update(x=a["x"].long()), r"x must be float64, float32, float16 or bfloat16"),
        "x_W0": (lambda a: a.update(x=a["x"][:, :0], ln_weight=None, ln_bias=None, proj=None), r"W > 0"),
        "rows_int32": (lambda a: a.update(rows=a["rows"].int()), r"rows must be int64"),
        "rows_2d": (lambda a: a.update(rows=a["rows"][None]), r"rows must be 1-D \[N\]"),
        "rows_high": (lambda a: a["rows"].__setitem__(2, 9), r"rows has value 9 at index 2; rows must lie in \[0, T = 9\)"),
        "rows_negative": (lambda a: a["rows"].__setitem__(0, -1), r"rows has value -1"),
        "weight_shape": (lambda a: a.update(ln_weight=a["ln_weight"][:-1]), r"ln_weight must be \[W\] = \[16\]"),
        "bias_shape": (lambda a: a.update(ln_bias=a["ln_bias"][None]), r"ln_bias must be \[W\] = \[16\]"),
        "weight_int": (lambda a: a.update(ln_weight=a["ln_weight"].long()), r"ln_weight must be float64"),
        "proj_W": (lambda a: a.update(proj=a["proj"][:-1]), r"proj must be \[W, E\] with W = 16"),
        "proj_1d": (lambda a: a.update(proj=a["proj"][:, 0]), r"proj must be \[W, E\]"),
        "eps_negative": (lambda a: a.update(eps=-1.0), r"eps must be finite and >= 0"),
        "eps_nan": (lambda a: a.update(eps=float("nan")), r"eps must be finite and >= 0"),
    }
    NAMES = ["x", "rows", "ln_weight", "ln_bias", "eps", "proj", "normalize"]

    @pytest.mark.parametrize("bad", sorted(BAD))
    def test_bad_inputs(self, bad):
        mutate, pattern = self.BAD[bad]
        a = dict(zip(self.NAMES, make_inputs(CASES[1], torch.float64, requires_grad=False)))  # T=9, W=16, E=8
        mutate(a)
        with pytest.raises(RuntimeError, match=pattern):
            _compiled()(*[a[n] for n in self.NAMES])

    def test_bad_backward_inputs(self):
        x, rows, w, b, eps, proj, norm = make_inputs(CASES[1], torch.float64, requires_grad=False)
        out, mean, rstd, nrm = torch.ops.fastprompt.pool_project_compiled_fwd(x, rows, w, b, eps, proj, True)
        bwd = torch.ops.fastprompt.pool_project_compiled_bwd
        with pytest.raises(RuntimeError, match=r"grad_out must be \[N, E\] = \[12, 8\]"):
            bwd(out[:-1], out, x, rows, w, mean, rstd, nrm, proj, True)
        with pytest.raises(RuntimeError, match=r"grad_out dtype Float differs from x dtype Double"):
            bwd(out.float(), out, x, rows, w, mean, rstd, nrm, proj, True)
        with pytest.raises(RuntimeError, match=r"mean and rstd must be Double"):
            bwd(out, out, x, rows, w, mean.float(), rstd, nrm, proj, True)
        with pytest.raises(RuntimeError, match=r"norm must be a Double \[N\]"):
            bwd(out, out, x, rows, w, mean, rstd, nrm[:0], proj, True)
        bad_rows = rows.clone()
        bad_rows[0] = 100
        with pytest.raises(RuntimeError, match=r"rows has value 100"):
            bwd(out, out, x, bad_rows, w, mean, rstd, nrm, proj, True)


# ----------------------------------------------------------------------------------------------- Triton
@needs_triton
class TestTriton:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    @pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: c.name)
    def test_matches_reference(self, case, dtype):
        args = make_inputs(case, dtype, device=TRITON_DEVICE)
        assert_matches(_triton(), args, args, TOL[dtype])

    def test_zero_norm_row(self):
        case = Case("zero", T=5, W=8, E=None, rows="repeats", affine="none", normalize=True, const_row=True)
        args = make_inputs(case, torch.float32, device=TRITON_DEVICE)
        assert torch.all(_triton()(*args)[0] == 0)
        assert_matches(_triton(), args, args, TOL[torch.float32])

    def test_nan_poisoned_allocations(self):
        args = make_inputs(CASES[1], torch.float32, device=TRITON_DEVICE)
        with _PoisonedEmpty():
            assert_matches(_triton(), args, args, TOL[torch.float32])

    def test_empty_rows(self):
        case = Case("empty", T=4, W=8, E=6, rows="empty", affine="both", normalize=True)
        args = make_inputs(case, torch.float32, device=TRITON_DEVICE)
        out = _triton()(*args)
        assert out.shape == (0, 6)
        (gx,) = torch.autograd.grad(out, [args[0]], torch.ones_like(out))
        assert torch.all(gx == 0)

    def test_dispatch(self):
        args = make_inputs(CASES[1], torch.float32, device=TRITON_DEVICE)
        assert_matches(lambda *a: pool_project(*a, backend="triton"), args, args, TOL[torch.float32])

    def test_opcheck(self):
        args = make_inputs(CASES[1], torch.float32, device=TRITON_DEVICE)
        from fastprompt.ops.pool_project import triton_impl as _mod  # noqa: F401  (registers the op)

        torch.library.opcheck(torch.ops.fastprompt.pool_project_triton_fwd.default, args)

    @pytest.mark.parametrize(
        "mutate,pattern",
        [
            (lambda a: a.update(x=a["x"][0]), r"x must be \[T, W\]"),
            (lambda a: a.update(rows=a["rows"].int()), r"rows must be an int64 \[N\]"),
            (lambda a: a.update(proj=a["proj"][:-1]), r"proj must be \[W, E\] with W = 16"),
        ],
        ids=["x_1d", "rows_int32", "proj_W"],
    )
    def test_bad_inputs(self, mutate, pattern):
        names = TestCompiledCPU.NAMES
        a = dict(zip(names, make_inputs(CASES[1], torch.float32, device=TRITON_DEVICE, requires_grad=False)))
        mutate(a)
        with pytest.raises(ValueError, match=pattern):
            _triton()(*[a[n] for n in names])

    @pytest.mark.skipif(TRITON_DEVICE != "cpu", reason="host-side row check only on the CPU")
    def test_rows_out_of_range(self):
        x, rows, *rest = make_inputs(CASES[1], torch.float32, requires_grad=False)
        rows = rows.clone()
        rows[0] = 9
        with pytest.raises(ValueError, match=r"rows must lie in \[0, T = 9\)"):
            _triton()(x, rows, *rest)


# ----------------------------------------------------------------------------------------------- CUDA
GPU_CASES = CASES + [
    Case("clip_b16", T=4000, W=512, E=512, rows="repeats", affine="both", normalize=True),
    Case("clip_b16_all", T=1000, W=512, E=512, rows="none", affine="both", normalize=True),
]


def _gpu_backends():
    out = []
    if extension_loaded() and extension_has_cuda():
        out.append("compiled")
    if _triton_ok and TRITON_DEVICE == "cuda":
        out.append("triton")
    return out


def _fn(backend):
    return _compiled() if backend == "compiled" else _triton()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
class TestCUDA:
    @pytest.mark.parametrize("backend", ["compiled", "triton"])
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.name)
    def test_matches_reference(self, case, dtype, backend):
        if backend not in _gpu_backends():
            pytest.skip(f"{backend} backend not available on CUDA")
        if backend == "triton" and dtype == torch.float64:
            pytest.skip("the Triton kernels compute float64 inputs in float32")
        args = make_inputs(case, dtype, device="cuda")
        if dtype == torch.bfloat16:  # the reference itself rounds bf16 intermediates: compare both with float64
            out, gx = run_with_grad(_fn(backend), args)
            r_out, r_gx = run_with_grad(pool_project_reference, _as_double(args))
            assert rel_err(out, r_out) <= TOL[dtype] and rel_err(gx, r_gx) <= TOL[dtype]
        else:
            assert_matches(_fn(backend), args, args, TOL[dtype])

    @pytest.mark.parametrize("backend", ["compiled", "triton"])
    def test_deterministic(self, backend):
        if backend not in _gpu_backends():
            pytest.skip(f"{backend} backend not available on CUDA")
        args = make_inputs(GPU_CASES[-2], torch.float32, device="cuda")
        first, second = run_with_grad(_fn(backend), args), run_with_grad(_fn(backend), args)
        for a, b in zip(first, second):
            assert torch.equal(a, b)

    @pytest.mark.parametrize("backend", ["compiled", "triton"])
    def test_nan_poisoned_allocations(self, backend):
        if backend not in _gpu_backends():
            pytest.skip(f"{backend} backend not available on CUDA")
        args = make_inputs(CASES[1], torch.float32, device="cuda")
        with _PoisonedEmpty():
            assert_matches(_fn(backend), args, args, TOL[torch.float32])

    @needs_ext
    @pytest.mark.skipif(not extension_has_cuda(), reason="fastprompt._C was built without CUDA kernels")
    @pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=lambda c: c.name)
    def test_opcheck(self, case):
        args = make_inputs(case, torch.float32, device="cuda")
        torch.library.opcheck(torch.ops.fastprompt.pool_project_compiled_fwd.default, args)

    @needs_ext
    @pytest.mark.skipif(not extension_has_cuda(), reason="fastprompt._C was built without CUDA kernels")
    def test_mixed_devices_error(self):
        x, rows, w, b, eps, proj, norm = make_inputs(CASES[1], torch.float32, device="cuda")
        with pytest.raises(RuntimeError, match="same device"):
            _compiled()(x, rows.cpu(), w, b, eps, proj, norm)

    def test_auto_dispatch(self):
        args = make_inputs(CASES[1], torch.float32, device="cuda")
        assert_matches(lambda *a: pool_project(*a, backend="auto"), args, args, TOL[torch.float32])
