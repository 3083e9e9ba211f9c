"""Compiled vs reference ``assemble`` (forward + backward) on CPU.

Run with ``pytest benchmarks/test_bench_assemble.py --benchmark-only``. Each compiled benchmark stores the
reference's median time and the speed-up (reference / compiled) in ``extra_info``.
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

from fastprompt._extension import extension_loaded, load_error
from fastprompt.ops.assemble.reference import assemble_reference

pytestmark = pytest.mark.skipif(not extension_loaded(), reason=f"fastprompt._C is not loaded ({load_error()})")

ROUNDS, WARMUP = 30, 3

# name: (G, M, C, L, D, pairs, shift); slot row = [SOS, ctx_0 .. ctx_{M-1}, fixed...]
SHAPES = {
    "coop": dict(G=1, M=4, C=1000, L=6, D=512, pairs="all", shift=False),  # one context, 1000 classes
    "cocoop": dict(G=8, M=4, C=100, L=5, D=512, pairs="all", shift=True),  # 8 images x 100 classes = 800 pairs
}


def _inputs(G, M, C, L, D, pairs, shift, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    ctx = torch.randn(G, M, D, generator=gen, dtype=dtype, requires_grad=True)
    sh = torch.randn(G, D, generator=gen, dtype=dtype, requires_grad=True) if shift else None
    fixed = torch.randn(C, L, D, generator=gen, dtype=dtype)
    pos = torch.randn(77, D, generator=gen, dtype=dtype)
    slot = torch.full((C, L), -1, dtype=torch.int64)
    slot[:, 1 : 1 + M] = torch.arange(M)
    g_idx = torch.arange(G).repeat_interleave(C)
    c_idx = torch.arange(C).repeat(G)
    grad_out = torch.randn(G * C, L, D, generator=gen, dtype=dtype)
    return (ctx, sh, fixed, slot, pos, 0, g_idx, c_idx), grad_out


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
