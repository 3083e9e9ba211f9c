"""``prefix_attention``: the reference against a naive per-row loop; the eager and Triton backends against the reference.

The Triton tests run on the CPU under ``TRITON_INTERPRET=1`` (set it on the command line, before triton is
imported: ``TRITON_INTERPRET=1 python -m pytest tests/ops/test_prefix_attention.py``), else on CUDA, else skip.
Interpreter shapes are tiny (a few dozen programs, dh = 16 / 32); the ``gpu`` class runs CLIP-sized shapes.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import List, Optional

import pytest
import torch

from fastprompt.ops._dispatch import triton_ok
from fastprompt.ops.prefix_attention import OP, prefix_attention
from fastprompt.ops.prefix_attention.eager import prefix_attention_eager
from fastprompt.ops.prefix_attention.reference import prefix_attention_reference

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
# The "CPU" Triton tests run in the interpreter, or on the GPU when there is one and no interpreter.
TRITON_DEVICE = "cpu" if INTERPRET else ("cuda" if HAS_CUDA else None)
_ok, _why = triton_ok(torch.device(TRITON_DEVICE or "cpu"))
needs_triton = pytest.mark.skipif(
    TRITON_DEVICE is None or not _ok,
    reason=_why or "Triton kernels need CUDA, or the CPU with TRITON_INTERPRET=1 set before triton is imported",
)

# max |triton - reference| / max |reference| allowed, per dtype
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 3e-2}


def _triton_module():
    from fastprompt.ops.prefix_attention import triton_impl as module

    return module


# ----------------------------------------------------------------------------------------------- inputs
@dataclass
class Case:
    name: str
    G: int
    P: int
    H: int
    dh: int
    lengths: List[int]
    groups: Optional[List[int]] = None  # None: all pairs in group 0


CASES = [
    Case("coop_G1", G=1, P=5, H=2, dh=16, lengths=[3, 1, 5, 2, 4]),
    Case("diagonal_G_eq_N", G=4, P=3, H=1, dh=32, lengths=[2, 4, 1, 3], groups=[0, 1, 2, 3]),
    Case("random_repeats_unused_group", G=4, P=4, H=2, dh=16, lengths=[1, 2, 3, 2, 1, 4], groups=[0, 2, 3, 2, 0, 2]),
    Case("long_33", G=2, P=2, H=1, dh=16, lengths=[33, 1, 17], groups=[1, 0, 1]),
    Case("P1_len1", G=2, P=1, H=2, dh=16, lengths=[1, 1, 2], groups=[1, 1, 0]),
    Case("P17_dh32", G=2, P=17, H=1, dh=32, lengths=[3, 5, 1, 2], groups=[0, 1, 1, 0]),
    Case("one_pair", G=1, P=4, H=2, dh=16, lengths=[6]),
    Case("blocks_G3", G=3, P=2, H=2, dh=16, lengths=[2, 1, 4, 3, 1, 2], groups=[0, 0, 1, 1, 2, 2]),
]
BY_NAME = {c.name: c for c in CASES}


def make_inputs(case: Case, dtype=torch.float64, device="cpu", seed=0, cu_dtype=torch.int64):
    """(q, k, v, k_prefix, v_prefix, cu_seqlens, g_idx, max_seqlen), float tensors requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(case.lengths, dtype=torch.int64)
    N, T = len(case.lengths), int(lengths.sum())
    cu = torch.zeros(N + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(lengths, 0)
    g_idx = torch.tensor(case.groups if case.groups is not None else [0] * N, dtype=torch.int64)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device).requires_grad_(True)

    H, dh = case.H, case.dh
    q, k, v = randn(T, H, dh), randn(T, H, dh), randn(T, H, dh)
    kp, vp = randn(case.G, H, case.P, dh), randn(case.G, H, case.P, dh)
    return q, k, v, kp, vp, cu.to(cu_dtype).to(device), g_idx.to(device), int(lengths.max())


def as_float64(args):
    return [a.detach().double().requires_grad_(True) if torch.is_tensor(a) and a.is_floating_point() else a for a in args]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if b.numel() == 0:
        return 0.0
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def run_with_grads(fn, args, seed=1):
    """[out, dq, dk, dv, dk_prefix, dv_prefix] for a random upstream gradient."""
    out = fn(*args)
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype).to(out.device)
    return [out] + list(torch.autograd.grad(out, args[:5], grad_out))


NAMES = ["out", "dq", "dk", "dv", "dk_prefix", "dv_prefix"]


def assert_close(got, want, tol):
    for name, a, b in zip(NAMES, got, want):
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert not torch.isnan(a).any(), f"{name} has NaN"
        err = rel_err(a, b)
        assert err <= tol, f"{name}: rel err {err:.3g} > {tol:g}"


def naive(q, k, v, k_prefix, v_prefix, cu_seqlens, g_idx):
    """Row-by-row attention (all heads at once): (out [T, H, dh], lse [T, H]) with autograd."""
    dh = q.shape[-1]
    outs, lses = [], []
    for n in range(g_idx.shape[0]):
        a, b, g = int(cu_seqlens[n]), int(cu_seqlens[n + 1]), int(g_idx[n])
        for j in range(b - a):
            keys = torch.cat([k_prefix[g], k[a : a + j + 1].transpose(0, 1)], dim=1)  # [H, P + j + 1, dh]
            values = torch.cat([v_prefix[g], v[a : a + j + 1].transpose(0, 1)], dim=1)
            scores = torch.einsum("hd,hkd->hk", q[a + j], keys) / math.sqrt(dh)
            outs.append(torch.einsum("hk,hkd->hd", torch.softmax(scores, -1), values))
            lses.append(torch.logsumexp(scores, -1))
    return torch.stack(outs), torch.stack(lses)


# ----------------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_reference_matches_naive_loop(case):
    args = make_inputs(case, torch.float64)
    got = run_with_grads(prefix_attention_reference, args)
    want = run_with_grads(lambda *a: naive(*a[:7])[0], args)
    assert_close(got, want, 1e-12)


def test_reference_int32_cu_seqlens():
    args = make_inputs(BY_NAME["random_repeats_unused_group"], torch.float64, cu_dtype=torch.int32)
    ref = prefix_attention_reference(*args)
    assert rel_err(ref, naive(*args[:7])[0]) <= 1e-12


# ----------------------------------------------------------------------------------------------- eager
def _blocked(case: Case) -> Optional[int]:
    """pairs_per_group when the case's groups are G contiguous equal blocks (CoCoOp's layout), else None."""
    N = len(case.lengths)
    groups = case.groups if case.groups is not None else [0] * N
    if N % case.G == 0 and groups == [n // (N // case.G) for n in range(N)]:
        return N // case.G
    return None


@pytest.mark.parametrize("extra_len", [0, 3], ids=["max_seqlen_exact", "max_seqlen_plus3"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_eager_matches_reference(case, extra_len):
    """Outputs and the gradients of q, k, v, k_prefix, v_prefix; every prefix-product mode the case allows."""
    args = list(make_inputs(case, torch.float64))
    args[7] += extra_len
    want = run_with_grads(prefix_attention_reference, args)
    assert_close(run_with_grads(prefix_attention_eager, args), want, 1e-12)
    per_group = _blocked(case)
    if per_group is not None:
        got = run_with_grads(lambda *a: prefix_attention_eager(*a, pairs_per_group=per_group), args)
        assert_close(got, want, 1e-12)


def test_eager_float32_and_int32_cu_seqlens():
    case = BY_NAME["random_repeats_unused_group"]
    args = make_inputs(case, torch.float32, cu_dtype=torch.int32)
    assert_close(run_with_grads(prefix_attention_eager, args), run_with_grads(prefix_attention_reference, as_float64(args)), 1e-5)


def test_eager_pairs_do_not_leak():
    """NaN in one pair's rows reaches none of the other pairs' outputs or row gradients (pad slots, which
    gather other pairs' rows, are masked out of the softmax and the backward)."""
    case = BY_NAME["random_repeats_unused_group"]
    args = make_inputs(case, torch.float64)
    cu = args[5]
    a, b = int(cu[2]), int(cu[3])  # pair 2's rows
    poisoned = []
    for i, t in enumerate(args[:3]):
        t = t.detach().clone()
        t[a:b] = float("nan")
        poisoned.append(t.requires_grad_(True))
    got = run_with_grads(prefix_attention_eager, poisoned + list(args[3:]))
    want = run_with_grads(prefix_attention_reference, args)
    keep = torch.ones(got[0].shape[0], dtype=torch.bool)
    keep[a:b] = False
    for name, x, y in zip(NAMES[:4], got[:4], want[:4]):
        assert not torch.isnan(x[keep]).any(), f"{name}: NaN leaked into another pair's rows"
        assert rel_err(x[keep], y[keep]) <= 1e-12, name


def test_eager_empty():
    q, k, v, kp, vp, cu, g_idx, S = make_inputs(BY_NAME["coop_G1"], torch.float64)
    out = prefix_attention_eager(q[:0], k[:0], v[:0], kp, vp, cu[:1], g_idx[:0], 1)
    assert out.shape == (0, q.shape[1], q.shape[2])
    g_kp, g_vp = torch.autograd.grad(out, [kp, vp], torch.ones_like(out))
    assert torch.all(g_kp == 0) and torch.all(g_vp == 0)


def test_eager_saves_only_inputs_and_lse():
    """Saved for the backward: the inputs (already alive) and a [T, H] log-sum-exp; no per-pair copies."""
    case = Case("saved", G=2, P=9, H=2, dh=16, lengths=[3, 1, 5, 2, 4, 2], groups=[0, 1, 0, 1, 1, 0])
    q, k, v, kp, vp, cu, g_idx, S = make_inputs(case, torch.float64)
    inputs = {t.untyped_storage().data_ptr() for t in (q, k, v, kp, vp, cu, g_idx)}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        prefix_attention_eager(q, k, v, kp, vp, cu, g_idx, S)
    extra = [t for t in saved if t.untyped_storage().data_ptr() not in inputs]
    assert [tuple(t.shape) for t in extra] == [(q.shape[0], case.H)]


def test_eager_traces_without_graph_breaks():
    """The dispatcher's eager path traces whole with dynamo (no host sync, no data-dependent shape) and
    compiles fullgraph to the same values and gradients."""
    case = BY_NAME["random_repeats_unused_group"]
    args = make_inputs(case, torch.float64)
    explained = torch._dynamo.explain(lambda *a: prefix_attention(*a, backend="auto"))(*args)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    compiled = torch.compile(lambda *a: prefix_attention(*a, backend="auto"), backend="aot_eager", fullgraph=True)
    assert_close(run_with_grads(compiled, args), run_with_grads(prefix_attention_reference, args), 1e-12)


def test_eager_under_autocast_matches_low_precision_reference():
    """Under CPU autocast the eager backend runs in bfloat16 like the reference's attention does."""
    case = BY_NAME["P17_dh32"]
    args = make_inputs(case, torch.float32)
    exact = run_with_grads(prefix_attention_reference, as_float64(args))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run_with_grads(lambda *a: prefix_attention(*a, backend="auto"), args)
        ref = run_with_grads(lambda *a: prefix_attention(*a, backend="reference"), args)
    assert got[0].dtype == ref[0].dtype == torch.bfloat16
    for name, g, r, e in zip(NAMES, got, ref, exact):
        # within a small multiple of the error the bfloat16 reference itself makes
        assert rel_err(g, e) <= 4 * max(rel_err(r, e), 2.0 ** -8), name


# ----------------------------------------------------------------------------------------------- triton
@pytest.fixture
def small_blocks(monkeypatch):
    """Force the multi-prefix-block (P > BLOCK_P = 16) and multi-chunk (2 pairs per chunk) backward paths."""
    module = _triton_module()
    monkeypatch.setattr(module, "MAX_BLOCK_P", 16)
    monkeypatch.setattr(module, "PAIRS_PER_CHUNK", 2)
    return module


def _triton_fn():
    return _triton_module().prefix_attention_triton


@needs_triton
class TestTriton:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
    def test_matches_reference(self, case, dtype):
        if INTERPRET and dtype == torch.bfloat16:
            pytest.skip("the Triton interpreter's bfloat16 tl.dot is wrong (bf16 operands stay bf16 in the dots); CUDA tests cover it")
        args = make_inputs(case, dtype, device=TRITON_DEVICE)
        got = run_with_grads(_triton_fn(), args)
        assert all(t.dtype == dtype for t in got)
        assert_close(got, run_with_grads(prefix_attention_reference, as_float64(args)), TOL[dtype])  # exact answer
        assert_close(got, run_with_grads(prefix_attention_reference, args), TOL[dtype])  # the contract, same dtype

    @pytest.mark.parametrize("name", ["coop_G1", "random_repeats_unused_group", "P17_dh32"])
    def test_chunked_and_blocked_paths(self, small_blocks, name):
        args = make_inputs(BY_NAME[name], torch.float32, device=TRITON_DEVICE)
        got = run_with_grads(_triton_fn(), args)
        assert_close(got, run_with_grads(prefix_attention_reference, as_float64(args)), TOL[torch.float32])

    @pytest.mark.parametrize("seed", range(8))
    def test_random_shapes(self, small_blocks, seed):
        """Random N <= 4, lengths 1..33, P 1..20, H 1..2, dh 16 / 32, groups with repeats, 1..3 pairs per chunk."""
        gen = torch.Generator().manual_seed(100 + seed)

        def rint(lo, hi):
            return int(torch.randint(lo, hi + 1, (1,), generator=gen))

        N, G = rint(1, 4), rint(1, 3)
        case = Case(f"random{seed}", G=G, P=rint(1, 20), H=rint(1, 2), dh=16 * rint(1, 2),
                    lengths=[rint(1, 33 if rint(0, 2) == 0 else 6) for _ in range(N)], groups=[rint(0, G - 1) for _ in range(N)])
        small_blocks.PAIRS_PER_CHUNK = rint(1, 3)
        args = make_inputs(case, torch.float32, device=TRITON_DEVICE, seed=seed)
        got = run_with_grads(_triton_fn(), args)
        assert_close(got, run_with_grads(prefix_attention_reference, as_float64(args)), TOL[torch.float32])

    def test_nan_poisoned_buffers(self, small_blocks, monkeypatch):
        """Every output / scratch buffer is fully written: NaN-filled allocations leave no trace."""
        monkeypatch.setattr(small_blocks, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))
        for name in ("random_repeats_unused_group", "P17_dh32"):
            args = make_inputs(BY_NAME[name], torch.float32, device=TRITON_DEVICE)
            got = run_with_grads(_triton_fn(), args)
            assert_close(got, run_with_grads(prefix_attention_reference, as_float64(args)), TOL[torch.float32])

    def test_lse_value_and_gradient(self, small_blocks):
        """The saved log-sum-exp is exact and differentiable (its gradient folds into delta)."""
        args = make_inputs(BY_NAME["P17_dh32"], torch.float32, device=TRITON_DEVICE)
        out, lse = torch.ops.fastprompt.prefix_attention_triton_fwd(*args)
        ref_args = as_float64(args)
        r_out, r_lse = naive(*ref_args[:7])
        assert rel_err(lse, r_lse) <= 1e-5 and rel_err(out, r_out) <= 1e-5
        gen = torch.Generator().manual_seed(3)
        g_out, g_lse = torch.randn(out.shape, generator=gen, dtype=torch.float64), torch.randn(lse.shape, generator=gen, dtype=torch.float64)
        got = torch.autograd.grad((out * g_out.float().to(out.device)).sum() + (lse * g_lse.float().to(out.device)).sum(), args[:5])
        want = torch.autograd.grad((r_out * g_out).sum() + (r_lse * g_lse).sum(), ref_args[:5])
        assert_close([out] + list(got), [r_out] + list(want), TOL[torch.float32])
        # lse alone (out unused: its gradient reaches the backward as None)
        got = torch.autograd.grad(torch.ops.fastprompt.prefix_attention_triton_fwd(*args)[1].sum(), args[:5])
        want = torch.autograd.grad(naive(*ref_args[:7])[1].sum(), ref_args[:5], allow_unused=True)
        for a, b in zip(got, want):  # lse does not depend on v / v_prefix
            assert rel_err(a, b) <= TOL[torch.float32] if b is not None else torch.all(a == 0)

    def test_backward_deterministic(self, small_blocks):
        args = make_inputs(BY_NAME["coop_G1"], torch.float32, device=TRITON_DEVICE)
        first, second = run_with_grads(_triton_fn(), args), run_with_grads(_triton_fn(), args)
        for a, b in zip(first, second):
            assert torch.equal(a, b)

    def test_strided_inputs(self):
        """q / k / v as views of a fused qkv projection, transposed prefixes, int32 cu_seqlens, expanded grad_out."""
        case = BY_NAME["random_repeats_unused_group"]
        q, k, v, kp, vp, cu, g_idx, S = make_inputs(case, torch.float32, device=TRITON_DEVICE, cu_dtype=torch.int32)
        qkv = torch.stack([q, k, v], 1).detach().requires_grad_(True)  # [T, 3, H, dh]
        pre = torch.stack([kp, vp], 0).transpose(2, 3).contiguous().transpose(2, 3).detach().requires_grad_(True)
        qs, ks, vs = qkv.unbind(1)
        kps, vps = pre.unbind(0)
        assert not qs.is_contiguous() and not kps.is_contiguous()
        grad = torch.randn(q.shape[0], 1, q.shape[2], device=q.device).expand(q.shape)
        got = torch.autograd.grad(_triton_fn()(qs, ks, vs, kps, vps, cu, g_idx, S), [qkv, pre], grad)
        ref = as_float64([qkv, pre])
        want = torch.autograd.grad(prefix_attention_reference(*ref[0].unbind(1), *ref[1].unbind(0), cu, g_idx, S), ref, grad.double())
        for a, b in zip(got, want):
            assert rel_err(a, b) <= TOL[torch.float32]

    def test_grad_only_where_needed(self):
        q, k, v, kp, vp, cu, g_idx, S = make_inputs(BY_NAME["coop_G1"], torch.float32, device=TRITON_DEVICE)
        kp, vp = kp.detach(), vp.detach()
        out = _triton_fn()(q, k, v, kp, vp, cu, g_idx, S)
        out.sum().backward()
        assert q.grad is not None and kp.grad is None
        with torch.no_grad():
            assert not _triton_fn()(q, k, v, kp, vp, cu, g_idx, S).requires_grad

    def test_empty_pairs(self):
        q, k, v, kp, vp, cu, g_idx, S = make_inputs(BY_NAME["coop_G1"], torch.float32, device=TRITON_DEVICE)
        out = _triton_fn()(q[:0], k[:0], v[:0], kp, vp, cu[:1], g_idx[:0], 1)
        assert out.shape == (0, q.shape[1], q.shape[2])
        g_kp, g_vp = torch.autograd.grad(out, [kp, vp], torch.ones_like(out))
        assert torch.all(g_kp == 0) and torch.all(g_vp == 0)

    def test_opcheck(self):
        # Full test_utils (schema, autograd registration, fake tensor, aot_dispatch_dynamic): ~10 s here.
        args = make_inputs(BY_NAME["random_repeats_unused_group"], torch.float32, device=TRITON_DEVICE)
        torch.library.opcheck(torch.ops.fastprompt.prefix_attention_triton_fwd.default, args)

    def test_torch_compile(self):
        args = make_inputs(BY_NAME["random_repeats_unused_group"], torch.float32, device=TRITON_DEVICE)
        compiled = torch.compile(_triton_fn(), backend="aot_eager", fullgraph=True)
        assert_close(run_with_grads(compiled, args), run_with_grads(prefix_attention_reference, as_float64(args)), TOL[torch.float32])

    # ------------------------------------------------------------------------------------- dispatch
    def test_dispatch_triton(self):
        args = make_inputs(BY_NAME["coop_G1"], torch.float32, device=TRITON_DEVICE)
        got = prefix_attention(*args, backend="triton")
        assert torch.equal(got, _triton_fn()(*args))

    # ------------------------------------------------------------------------------------- bad inputs
    BAD = {
        "dh_not_pow2": (lambda a: [torch.cat([t, t[..., :8]], -1) if i < 5 else t for i, t in enumerate(a)], r"power of two >= 16, got 24"),
        "float64": (lambda a: [t.double() if i < 5 else t for i, t in enumerate(a)], r"float32, float16 or bfloat16"),
        "dtype_mismatch": (lambda a: [t.half() if i == 3 else t for i, t in enumerate(a)], r"k_prefix dtype"),
        "prefix_heads": (lambda a: [t[:, :1] if i in (3, 4) else t for i, t in enumerate(a)], r"k_prefix must be \[G, H=2"),
        "cu_length": (lambda a: a[:5] + [a[5][:-1]] + a[6:], r"cu_seqlens must be \[N \+ 1\]"),
        "g_idx_int32": (lambda a: a[:6] + [a[6].int(), a[7]], r"g_idx must be \[N\] int64"),
        "max_seqlen_short": (lambda a: a[:7] + [a[7] - 1], r"suffix lengths must lie in \[0, max_seqlen = 4\]"),
    }

    @pytest.mark.parametrize("bad", sorted(BAD))
    def test_bad_inputs(self, bad):
        if TRITON_DEVICE != "cpu" and bad == "max_seqlen_short":
            pytest.skip("lengths are only checked on the CPU (no host sync on CUDA)")
        mutate, pattern = self.BAD[bad]
        args = [a.detach() if torch.is_tensor(a) else a for a in make_inputs(BY_NAME["coop_G1"], torch.float32, device=TRITON_DEVICE)]
        args = mutate(args)
        with pytest.raises(RuntimeError, match=pattern):
            _triton_fn()(*args)


# ----------------------------------------------------------------------------------------------- dispatch
def test_dispatch_auto_on_cpu_is_eager():
    assert OP.resolve("auto", torch.device("cpu")) == "eager"  # never the interpreter
    args = make_inputs(BY_NAME["coop_G1"], torch.float64)
    assert torch.equal(prefix_attention(*args, backend="auto"), prefix_attention_eager(*args))
    assert torch.equal(prefix_attention(*args, backend="reference"), prefix_attention_reference(*args))


def test_dispatch_missing_backend():
    args = make_inputs(BY_NAME["coop_G1"], torch.float64)
    with pytest.raises(ValueError, match="no 'compiled' backend"):
        prefix_attention(*args, backend="compiled")
    assert torch.equal(prefix_attention(*args, backend="compiled", strict=False), prefix_attention_reference(*args))


@pytest.mark.skipif(INTERPRET, reason="TRITON_INTERPRET=1 makes the triton backend usable on the CPU")
def test_dispatch_triton_unavailable_on_cpu():
    args = make_inputs(BY_NAME["coop_G1"], torch.float32)
    with pytest.raises(RuntimeError, match="backend 'triton' is not available"):
        prefix_attention(*args, backend="triton")


# ----------------------------------------------------------------------------------------------- CUDA
def _big(N, G, P, H, dh, max_len, seed=0, dtype=torch.float32, **kw):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (N,), generator=gen).tolist()
    groups = torch.randint(0, G, (N,), generator=gen).tolist()
    return make_inputs(Case("big", G=G, P=P, H=H, dh=dh, lengths=lengths, groups=groups), dtype, device="cuda", seed=seed, **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
class TestTritonCUDA:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
    def test_clip_shape(self, dtype):
        args = _big(N=800, G=8, P=5, H=8, dh=64, max_len=20, dtype=dtype)
        got = run_with_grads(_triton_fn(), args)
        assert_close(got, run_with_grads(prefix_attention_reference, as_float64(args)), TOL[dtype])

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_coop_shape_one_group(self, dtype):
        args = _big(N=1000, G=1, P=17, H=8, dh=64, max_len=14, dtype=dtype)
        got = run_with_grads(_triton_fn(), args)
        assert_close(got, run_with_grads(prefix_attention_reference, as_float64(args)), TOL[dtype])

    @pytest.mark.parametrize("N,G,P,H,dh,max_len", [(64, 64, 20, 1, 128, 35), (300, 7, 77, 2, 16, 3), (5, 2, 1, 3, 32, 1)])
    def test_odd_shapes(self, N, G, P, H, dh, max_len):
        args = _big(N=N, G=G, P=P, H=H, dh=dh, max_len=max_len)
        got = run_with_grads(_triton_fn(), args)
        assert_close(got, run_with_grads(prefix_attention_reference, as_float64(args)), TOL[torch.float32])

    def test_chunked_and_blocked_paths(self, small_blocks):
        args = _big(N=500, G=3, P=40, H=4, dh=64, max_len=9)
        got = run_with_grads(_triton_fn(), args)
        assert_close(got, run_with_grads(prefix_attention_reference, as_float64(args)), TOL[torch.float32])

    def test_backward_deterministic(self):
        args = _big(N=2000, G=2, P=17, H=8, dh=64, max_len=14)
        first, second = run_with_grads(_triton_fn(), args), run_with_grads(_triton_fn(), args)
        for a, b in zip(first, second):
            assert torch.equal(a, b)

    def test_opcheck(self):
        args = _big(N=50, G=4, P=5, H=8, dh=64, max_len=10)
        torch.library.opcheck(torch.ops.fastprompt.prefix_attention_triton_fwd.default, args)

    def test_dispatch_auto_is_triton(self):
        args = _big(N=40, G=4, P=5, H=2, dh=64, max_len=6)
        assert OP.resolve("auto", torch.device("cuda")) == "triton"
        assert torch.equal(prefix_attention(*args, backend="auto"), _triton_fn()(*args))
