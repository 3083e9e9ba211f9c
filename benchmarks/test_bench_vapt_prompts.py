"""Triton vs reference ``vapt_prompts`` (VAPT's per-layer prompt generator), forward + backward, on CUDA.

Run with ``pytest benchmarks/test_bench_vapt_prompts.py --benchmark-only`` on a machine with a GPU; CPU runs
skip (the Triton interpreter is a correctness tool, not a benchmark). Shapes are one ViT-B/16 layer at 224 px:
x [B, 196, 768], N = 10 prompts, hidden 8, 2 x 2 kernel, with the training-mode dropout masks. Each test reports
``triton.testing.do_bench`` medians (CUDA events) of the reference and of the implementation, same test.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import record
from fastprompt.ops.vapt_prompts import dropout_masks
from fastprompt.ops.vapt_prompts.reference import vapt_prompts_reference

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: Triton on the CPU runs under its interpreter, not a benchmark"
)

SHAPES = {"vitb16_b64": dict(B=64, H=14, W=14, D=768, N=10, Dh=8), "vitb16_b8": dict(B=8, H=14, W=14, D=768, N=10, Dh=8)}


def _inputs(B, H, W, D, N, Dh, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s, std=1.0: (torch.randn(*s, generator=g, device="cuda") * std).to(dtype).requires_grad_()  # noqa: E731
    x = r(B, H * W, D)
    params = (r(D, std=0.1).detach().add_(1).requires_grad_(), r(D, std=0.1), r(2, 2), r(N, (H - 1) * (W - 1), std=0.05),
              r(N), r(Dh, D, std=0.05), r(D, Dh, std=0.3))
    cm, hm = dropout_masks(B, D, N, Dh, 0.1, 0.1, dtype, "cuda")
    return x, params, cm, hm, torch.randn(B, N, D, generator=g, device="cuda").to(dtype)


def _step(fn, x, params, cm, hm, grid, up):
    lw, lb, k, tw, tb, w1, w2 = params
    out = fn(x, lw, lb, 1e-6, k, tw, tb, w1, w2, grid, cm, hm)
    return torch.autograd.grad(out, (x, *params), up)


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_bench_vapt_prompts_fwd_bwd(benchmark, shape, impl):
    import triton.testing

    from fastprompt.ops.vapt_prompts.triton_impl import vapt_prompts_triton

    cfg = SHAPES[shape]
    x, params, cm, hm, up = _inputs(**cfg, dtype=torch.float32)
    grid = (cfg["H"], cfg["W"])
    fn = vapt_prompts_triton if impl == "triton" else vapt_prompts_reference
    got, ref = _step(fn, x, params, cm, hm, grid, up), _step(vapt_prompts_reference, x, params, cm, hm, grid, up)
    err = max(((a - b).norm() / b.norm()).item() for a, b in zip(got, ref))
    assert err <= 1e-5, err
    bench = lambda f: float(triton.testing.do_bench(lambda: _step(f, x, params, cm, hm, grid, up), warmup=25, rep=200,  # noqa: E731
                                                   return_mode="median"))
    ms, ref_ms = bench(fn), bench(vapt_prompts_reference)

    def one_round():
        _step(fn, x, params, cm, hm, grid, up)
        torch.cuda.synchronize()

    benchmark.group = f"vapt_prompts fwd+bwd {shape}"
    benchmark.pedantic(one_round, rounds=50, warmup_rounds=5, iterations=1)
    info = {"bench": f"vapt_prompts {shape} {impl}", "device": torch.cuda.get_device_name(0), "dtype": "float32",
            "reference_ms": ref_ms, "fast_ms": ms, "speedup": ref_ms / ms, "max_rel_err": err}
    benchmark.extra_info.update(cfg, **info)
    record(info)
