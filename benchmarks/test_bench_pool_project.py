"""``pool_project`` (gather + LayerNorm + projection + L2 normalisation) forward + backward, fast vs reference.

Run with ``pytest benchmarks/test_bench_pool_project.py --benchmark-only``.

* CPU: compiled vs reference (N = 1000 pooled rows, W = E = 512, float32); each compiled benchmark stores the
  reference's median and the speed-up (reference / compiled) in ``extra_info``.
* CUDA (when present): reference, compiled and Triton at CLIP ViT-B/16 scale (N = 32,000 rows); medians from
  ``triton.testing.do_bench``, with the bytes the kernel sequence moves and the achieved bandwidth in
  ``extra_info`` (the Triton interpreter is never timed).
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

from fastprompt._extension import extension_has_cuda, extension_loaded, load_error
from fastprompt.ops.pool_project.reference import pool_project_reference

ROUNDS, WARMUP = 20, 3

# name: (N pooled rows, T rows of x (None: rows=None, T = N), W, E)
CPU_SHAPES = {
    "all_rows": dict(N=1000, T=None, W=512, E=512),  # every row pooled (rows=None)
    "eot": dict(N=1000, T=8000, W=512, E=512),  # one EOT row per prompt out of packed rows
}
CUDA_SHAPES = {
    "all_rows": dict(N=32000, T=None, W=512, E=512),
    "eot": dict(N=32000, T=128000, W=512, E=512),
}


def _inputs(N, T, W, E, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    rows = None if T is None else torch.randperm(T, generator=gen)[:N].sort().values.to(device)
    x = torch.randn(T or N, W, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    w = (1 + 0.1 * torch.randn(W, generator=gen)).to(device=device, dtype=dtype)
    b = (0.1 * torch.randn(W, generator=gen)).to(device=device, dtype=dtype)
    proj = (torch.randn(W, E, generator=gen) * W**-0.5).to(device=device, dtype=dtype)
    grad_out = torch.randn(N, E, generator=gen).to(device=device, dtype=dtype)
    return (x, rows, w, b, 1e-5, proj, True), grad_out


def _step(fn, args, grad_out):
    out = fn(*args)
    return torch.autograd.grad(out, [args[0]], grad_out)


def _median_seconds(fn, rounds=ROUNDS, warmup=WARMUP):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _impl(name):
    if name == "compiled":
        from fastprompt.ops.pool_project.compiled import pool_project_compiled

        return pool_project_compiled
    if name == "triton":
        from fastprompt.ops.pool_project.triton_impl import pool_project_triton

        return pool_project_triton
    return pool_project_reference


def bytes_moved(N, T, W, E, itemsize, stats_itemsize=4):
    """Global-memory bytes of the fast kernel sequence, forward + backward (GEMM operands counted once each).

    forward:  x rows in, y out | GEMM y, proj in, h out | normalise h in and out | mean, rstd, norm out
    backward: g, out in, g_h out | GEMM g_h, proj in, g_y out | x, g_y in, grad_x (all T rows) out | stats in
    """
    T = T or N
    fwd = (2 * N * W + (N * W + W * E + N * E) + 2 * N * E) * itemsize + 3 * N * stats_itemsize
    bwd = (3 * N * E + (N * E + W * E + N * W) + (N * W + N * W + T * W)) * itemsize + 3 * N * stats_itemsize
    return fwd + bwd


# ----------------------------------------------------------------------------------------------- CPU
@pytest.mark.skipif(not extension_loaded(), reason=f"fastprompt._C is not loaded ({load_error()})")
@pytest.mark.parametrize("impl", ["reference", "compiled"])
@pytest.mark.parametrize("shape", sorted(CPU_SHAPES))
def test_bench_pool_project_cpu(benchmark, shape, impl):
    args, grad_out = _inputs(**CPU_SHAPES[shape])
    fn = _impl(impl)
    benchmark.group = f"pool_project fwd+bwd cpu {shape}"
    benchmark.extra_info.update(CPU_SHAPES[shape], impl=impl, dtype="float32", threads=torch.get_num_threads())
    benchmark.pedantic(_step, args=(fn, args, grad_out), rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    if impl != "reference":
        ref_s = _median_seconds(lambda: _step(pool_project_reference, args, grad_out))
        ours_s = benchmark.stats.stats.median
        benchmark.extra_info["reference_median_s"] = ref_s
        benchmark.extra_info["speedup_vs_reference"] = ref_s / ours_s
        print(f"\n{shape}: {impl} {ours_s * 1e3:.3f} ms, reference {ref_s * 1e3:.3f} ms, x{ref_s / ours_s:.2f}")


# ----------------------------------------------------------------------------------------------- CUDA
def _cuda_available(impl):
    if impl == "compiled":
        return extension_loaded() and extension_has_cuda()
    if impl == "triton":
        from fastprompt.ops._dispatch import triton_interpreting

        if triton_interpreting():  # never time the interpreter
            return False
        try:
            import triton  # noqa: F401
        except Exception:
            return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("impl", ["reference", "compiled", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", sorted(CUDA_SHAPES))
def test_bench_pool_project_cuda(benchmark, shape, dtype, impl):
    if not _cuda_available(impl):
        pytest.skip(f"{impl} backend not available on CUDA")
    from triton.testing import do_bench

    args, grad_out = _inputs(**CUDA_SHAPES[shape], dtype=dtype, device="cuda")
    fn = _impl(impl)

    def step():
        return _step(fn, args, grad_out)

    def synced():
        step()
        torch.cuda.synchronize()

    benchmark.group = f"pool_project fwd+bwd cuda {shape} {dtype}"
    s = CUDA_SHAPES[shape]
    nbytes = bytes_moved(s["N"], s["T"], s["W"], s["E"], torch.tensor([], dtype=dtype).element_size())
    benchmark.extra_info.update(s, impl=impl, dtype=str(dtype), device=torch.cuda.get_device_name(0))
    benchmark.pedantic(synced, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    ms = do_bench(step, return_mode="median")
    benchmark.extra_info.update(do_bench_median_ms=ms, bytes_moved=nbytes, achieved_GBps=nbytes / (ms * 1e-3) / 1e9)
    line = f"\n{shape} {dtype} {impl}: {ms:.3f} ms, {nbytes / (ms * 1e-3) / 1e9:.0f} GB/s"
    if impl != "reference":
        ref_ms = do_bench(lambda: _step(pool_project_reference, args, grad_out), return_mode="median")
        benchmark.extra_info.update(reference_median_ms=ref_ms, speedup_vs_reference=ref_ms / ms)
        line += f", reference {ref_ms:.3f} ms, x{ref_ms / ms:.2f}"
    print(line)
