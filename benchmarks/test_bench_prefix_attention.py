"""Triton vs reference ``prefix_attention`` (forward + backward) on CUDA, CLIP ViT-B/16 text shapes (H=8, dh=64).

Run with ``pytest benchmarks/test_bench_prefix_attention.py --benchmark-only`` on a CUDA machine. GPU times are
``triton.testing.do_bench`` medians (ms); the pytest-benchmark row is the Triton step timed with
``benchmark.pedantic`` (synchronised). ``extra_info`` holds both medians, the ratio reference / triton, the
FLOPs of one fwd+bwd and the achieved TFLOP/s.

FLOPs count only useful (unpadded, causal) work: per (row, visible key, head) 4*dh in the forward (QK^T, PV) and
8*dh in the backward (dV, dP, dQ, dK), so fwd+bwd = 12*dh per (row, key, head); the backward's recomputation of
QK^T and the reference's padding are not counted.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import record
from fastprompt.ops.prefix_attention.reference import prefix_attention_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton prefix_attention benchmark needs a CUDA device")

# name: (G, N, P, lengths lo..hi); H = 8, dh = 64 (CLIP ViT-B/16 text tower)
SHAPES = {
    "coop": dict(G=1, N=1000, P=17, lo=3, hi=14),  # one learned context (SOS + 16 ctx), 1000 ImageNet classes
    "cocoop": dict(G=32, N=3200, P=5, lo=3, hi=14),  # 32 images x 100 classes, SOS + 4 ctx per image
}
H, DH = 8, 64


def _inputs(G, N, P, lo, hi, dtype):
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(lo, hi + 1, (N,), generator=gen)
    cu = torch.zeros(N + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(lengths, 0)
    T = int(cu[-1])
    g_idx = torch.arange(G).repeat_interleave(N // G)  # pairs grouped by image, as the engine builds them

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).cuda().requires_grad_(True)

    args = (randn(T, H, DH), randn(T, H, DH), randn(T, H, DH), randn(G, H, P, DH), randn(G, H, P, DH),
            cu.cuda(), g_idx.cuda(), int(lengths.max()))
    grad_out = torch.randn(T, H, DH, generator=gen).to(dtype).cuda()
    flops = 12 * DH * H * int(sum(P + j + 1 for s in lengths.tolist() for j in range(s)))
    return args, grad_out, flops


def _step(fn, args, grad_out):
    out = fn(*args)
    return torch.autograd.grad(out, args[:5], grad_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_bench_prefix_attention_fwd_bwd(benchmark, shape, dtype):
    import triton.testing

    from fastprompt.ops.prefix_attention.triton_impl import prefix_attention_triton

    args, grad_out, flops = _inputs(**SHAPES[shape], dtype=dtype)
    ref_grads, tri_grads = _step(prefix_attention_reference, args, grad_out), _step(prefix_attention_triton, args, grad_out)
    err = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(tri_grads, ref_grads))

    ref_ms = triton.testing.do_bench(lambda: _step(prefix_attention_reference, args, grad_out), return_mode="median")
    tri_ms = triton.testing.do_bench(lambda: _step(prefix_attention_triton, args, grad_out), return_mode="median")
    tri_fwd_ms = triton.testing.do_bench(lambda: prefix_attention_triton(*args), return_mode="median")
    ref_fwd_ms = triton.testing.do_bench(lambda: prefix_attention_reference(*args), return_mode="median")

    def step():
        _step(prefix_attention_triton, args, grad_out)
        torch.cuda.synchronize()

    benchmark.group = f"prefix_attention fwd+bwd {shape}"
    benchmark.pedantic(step, rounds=20, warmup_rounds=3, iterations=1)
    info = {
        "shape": shape, **SHAPES[shape], "H": H, "dh": DH, "dtype": str(dtype).replace("torch.", ""),
        "reference_ms": ref_ms, "triton_ms": tri_ms, "speedup": ref_ms / tri_ms,
        "reference_fwd_ms": ref_fwd_ms, "triton_fwd_ms": tri_fwd_ms,
        "gflops_fwd_bwd": flops / 1e9, "triton_tflops": flops / (tri_ms * 1e-3) / 1e12,
        "reference_tflops": flops / (ref_ms * 1e-3) / 1e12, "max_rel_err_grads": err,
        "device": torch.cuda.get_device_name(0),
    }
    benchmark.extra_info.update(info)
    record(info)
    print(f"\n{shape} {dtype}: triton {tri_ms:.3f} ms, reference {ref_ms:.3f} ms, x{ref_ms / tri_ms:.2f}, "
          f"{info['triton_tflops']:.2f} TFLOP/s, max rel err {err:.2e}")
