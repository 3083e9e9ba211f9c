"""Triton vs reference ``condition`` (the conditioning MLP), forward + backward, on CUDA.

Run with ``pytest benchmarks/test_bench_condition.py --benchmark-only`` on a machine with a GPU. CPU runs skip:
the Triton interpreter is a correctness tool, not a benchmark.

Each test times one fwd+bwd step twice: pytest-benchmark's own table (``benchmark.pedantic``, wall clock with a
device sync per round), and, for the numbers in ``extra_info``, ``triton.testing.do_bench`` medians (CUDA events,
L2 flushed between runs) of both the reference and the implementation under test, in the same test. ``extra_info``
holds both medians, ``speedup_vs_reference`` (reference / impl), the bytes one step must move at least and the
bandwidth that implies. At CoCoOp's size the op is launch-bound (about 0.6 MB per float32 step), so the bandwidth
figure mostly shows how far from memory-bound it is.
"""
from __future__ import annotations

import pytest
import torch

from fastprompt.ops.condition.reference import condition_reference

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: Triton on the CPU runs under its interpreter, not a benchmark"
)

ROUNDS, WARMUP = 50, 5

# name: (B, Din, Dh, Dout, activation, scale); CoCoOp's meta-net: 512 -> 512 / 16 -> 512, relu, batch 32
SHAPES = {
    "cocoop": dict(B=32, Din=512, Dh=32, Dout=512, activation="relu", scale=1.0),
}


def _inputs(B, Din, Dh, Dout, activation, scale, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, std=1.0, grad=True):
        t = torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32) * std
        return t.to(dtype).requires_grad_(grad)

    x = randn(B, Din, grad=False)  # image features: frozen, as in CoCoOp
    params = (randn(Dh, Din, std=Din**-0.5), randn(Dh, std=0.1), randn(Dout, Dh, std=Dh**-0.5), randn(Dout, std=0.1))
    grad_out = torch.randn(B, Dout, generator=gen, device="cuda", dtype=torch.float32).to(dtype)
    return (x, *params, activation, 0.01, scale), grad_out


def _bytes_per_step(B, Din, Dh, Dout, dtype, **_):
    """Compulsory traffic of one fwd+bwd: every tensor read / written once per pass (+ the saved hidden layer)."""
    el = torch.finfo(dtype).bits // 8
    params = Dh * Din + Dh + Dout * Dh + Dout
    fwd = el * (B * Din + params + B * Dout) + 4 * B * Dh  # inputs, output, float32 hidden layer written
    bwd = el * (B * Dout + B * Din + Dh * Din + Dout * Dh + params) + 4 * B * Dh  # + param grads, hidden read
    return fwd + bwd


def _fn(impl):
    if impl == "triton":
        from fastprompt.ops.condition.triton_impl import condition_triton

        return condition_triton
    return condition_reference


def _step(fn, args, grad_out):
    wrt = [a for a in args[:5] if torch.is_tensor(a) and a.requires_grad]
    return torch.autograd.grad(fn(*args), wrt, grad_out)


def _do_bench_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_bench_condition_fwd_bwd(benchmark, shape, impl, dtype):
    cfg = SHAPES[shape]
    args, grad_out = _inputs(**cfg, dtype=dtype)
    fn = _fn(impl)
    got, ref = _step(fn, args, grad_out), _step(condition_reference, args, grad_out)  # warm-up (JIT) + check
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(got, ref):
        assert ((a - b).abs().max() / b.abs().max()).item() <= tol

    # event-timed medians of both implementations (the numbers extra_info reports)
    medians = {
        "impl": _do_bench_ms(lambda: _step(fn, args, grad_out)),
        "reference": _do_bench_ms(lambda: _step(condition_reference, args, grad_out)),
    }

    def one_round():
        _step(fn, args, grad_out)
        torch.cuda.synchronize()

    benchmark.group = f"condition fwd+bwd {shape} {dtype}"
    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    nbytes = _bytes_per_step(**cfg, dtype=dtype)
    ms = medians["impl"]
    benchmark.extra_info.update(
        cfg,
        impl=impl,
        dtype=str(dtype),
        device=torch.cuda.get_device_name(0),
        do_bench_median_ms=ms,
        reference_do_bench_median_ms=medians["reference"],
        speedup_vs_reference=medians["reference"] / ms,
        bytes_per_step=nbytes,
        achieved_GBps=nbytes / (ms * 1e-3) / 1e9,
    )
    print(f"\n{shape} {dtype} {impl}: {ms * 1e3:.1f} us, reference {medians['reference'] * 1e3:.1f} us, "
          f"x{medians['reference'] / ms:.2f}, {nbytes / (ms * 1e-3) / 1e9:.1f} GB/s")
