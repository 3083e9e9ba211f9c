"""Compiled (CPU) and Triton (CUDA) vs reference ``assemble`` (forward + backward).

Run with ``pytest benchmarks/test_bench_assemble.py --benchmark-only``. Each compiled benchmark stores the
reference's median time and the speed-up (reference / compiled) in ``extra_info``.

The Triton benchmarks run on CUDA only (on the CPU Triton runs under its interpreter, which is not a benchmark):
pytest-benchmark times a synced fwd+bwd step; ``extra_info`` holds ``triton.testing.do_bench`` medians (CUDA
events, L2 flushed) of the implementation and of the reference, their ratio, the bytes a step must move and the
bandwidth achieved.
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

from fastprompt._extension import extension_loaded, load_error
from fastprompt.ops.assemble.reference import assemble_reference

needs_ext = pytest.mark.skipif(not extension_loaded(), reason=f"fastprompt._C is not loaded ({load_error()})")
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: Triton on the CPU runs under its interpreter, not a benchmark"
)

ROUNDS, WARMUP = 30, 3

# name: (G, M, C, L, D, pairs, shift); slot row = [SOS, ctx_0 .. ctx_{M-1}, fixed...]
SHAPES = {
    "coop": dict(G=1, M=4, C=1000, L=6, D=512, pairs="all", shift=False),  # one context, 1000 classes
    "cocoop": dict(G=8, M=4, C=100, L=5, D=512, pairs="all", shift=True),  # 8 images x 100 classes = 800 pairs
}


def _inputs(G, M, C, L, D, pairs, shift, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    ctx = torch.randn(G, M, D, generator=gen, dtype=dtype).to(device).requires_grad_(True)
    sh = torch.randn(G, D, generator=gen, dtype=dtype).to(device).requires_grad_(True) if shift else None
    fixed = torch.randn(C, L, D, generator=gen, dtype=dtype).to(device)
    pos = torch.randn(77, D, generator=gen, dtype=dtype).to(device)
    slot = torch.full((C, L), -1, dtype=torch.int64)
    slot[:, 1 : 1 + M] = torch.arange(M)
    g_idx = torch.arange(G).repeat_interleave(C).to(device)
    c_idx = torch.arange(C).repeat(G).to(device)
    grad_out = torch.randn(G * C, L, D, generator=gen, dtype=dtype).to(device)
    return (ctx, sh, fixed, slot.to(device), pos, 0, g_idx, c_idx), grad_out


def _step(fn, args, grad_out):
    wrt = [a for a in args[:2] if a is not None]
    out = fn(*args)
    return torch.autograd.grad(out, wrt, grad_out)


def _median_seconds(fn, rounds=ROUNDS, warmup=WARMUP):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@needs_ext
@pytest.mark.parametrize("impl", ["reference", "compiled"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_bench_assemble_fwd_bwd(benchmark, shape, impl):
    from fastprompt.ops.assemble.compiled import assemble_compiled

    args, grad_out = _inputs(**SHAPES[shape])
    fn = assemble_compiled if impl == "compiled" else assemble_reference
    benchmark.group = f"assemble fwd+bwd {shape}"
    benchmark.extra_info.update(SHAPES[shape], impl=impl, threads=torch.get_num_threads())
    benchmark.pedantic(_step, args=(fn, args, grad_out), rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    if impl == "compiled":
        ref_s = _median_seconds(lambda: _step(assemble_reference, args, grad_out))
        ours_s = benchmark.stats.stats.median
        benchmark.extra_info["reference_median_s"] = ref_s
        benchmark.extra_info["speedup_vs_reference"] = ref_s / ours_s
        print(f"\n{shape}: compiled {ours_s * 1e3:.3f} ms, reference {ref_s * 1e3:.3f} ms, x{ref_s / ours_s:.2f}")


# ---------------------------------------------------------------------------------------------- Triton (CUDA)
def _bytes_per_step(G, M, C, L, D, pairs, shift, dtype):
    """Compulsory traffic of one fwd+bwd at the kernels' access pattern (N = G * C pairs).

    Forward: every output row written and one source row (context or fixed) read per position; the L positional
    rows once (they stay in cache across pairs). Backward: the context rows of the upstream gradient read, grad_ctx
    (+ grad_shift) written.
    Index tensors are ignored (a few KB).
    """
    el = torch.finfo(dtype).bits // 8
    N = G * C
    fwd = el * (2 * N * L * D + L * D)
    bwd = el * (N * M * D + G * M * D + (G * D if shift else 0))
    return fwd + bwd


def _do_bench_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_bench_assemble_triton_fwd_bwd(benchmark, shape, impl, dtype):
    from fastprompt.ops.assemble.triton_impl import assemble_triton

    cfg = SHAPES[shape]
    args, grad_out = _inputs(**cfg, dtype=dtype, device="cuda")
    fn = assemble_triton if impl == "triton" else assemble_reference
    got, ref = _step(fn, args, grad_out), _step(assemble_reference, args, grad_out)  # warm-up (JIT) + check
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(got, ref):
        assert ((a - b).abs().max() / b.abs().max()).item() <= tol

    ms = _do_bench_ms(lambda: _step(fn, args, grad_out))
    ref_ms = _do_bench_ms(lambda: _step(assemble_reference, args, grad_out))

    def one_round():
        _step(fn, args, grad_out)
        torch.cuda.synchronize()

    benchmark.group = f"assemble fwd+bwd {shape} cuda {dtype}"
    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    nbytes = _bytes_per_step(**cfg, dtype=dtype)
    benchmark.extra_info.update(
        cfg,
        impl=impl,
        dtype=str(dtype),
        device=torch.cuda.get_device_name(0),
        do_bench_median_ms=ms,
        reference_do_bench_median_ms=ref_ms,
        speedup_vs_reference=ref_ms / ms,
        bytes_per_step=nbytes,
        achieved_GBps=nbytes / (ms * 1e-3) / 1e9,
    )
    print(f"\n{shape} {dtype} {impl}: {ms * 1e3:.1f} us, reference {ref_ms * 1e3:.1f} us, x{ref_ms / ms:.2f}, "
          f"{nbytes / (ms * 1e-3) / 1e9:.1f} GB/s")
