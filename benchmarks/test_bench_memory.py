"""Activation memory saved for the backward: official 77-token reference vs fast engine, and per attention op.

Counted with ``torch.autograd.graph.saved_tensors_hooks`` during the forward of the text side: every tensor
autograd saves, de-duplicated by storage (views of one buffer count once, at the storage's full size), with the
storages of parameters and buffers left out (weights are not activations). The count is device-independent;
it runs on the CPU in float32 with the ViT-B-16 text tower (random weights) and the first 100 ImageNet names:

* CoOp, N = 100 classes, M = 16 context tokens;
* CoCoOp, B = 4 images x N = 100 classes (M = 4).

The learner rows assert the fast engine saves at least 14x less than the reference. The op rows compare the
``prefix_attention`` reference (per-pair prefix copies, padded SDPA) with the eager backend (inputs and a
[T, H] log-sum-exp only) on CLIP-like shapes, with their fwd+bwd CPU time.

Run: ``pytest benchmarks/test_bench_memory.py --benchmark-only -s`` (the CoCoOp reference holds ~7 GiB).
"""
from __future__ import annotations

from typing import Callable, Iterable

import pytest
import torch

from benchmarks.conftest import median_ms, record
from fastprompt.benchmarking.text import BenchCase, build_case
from fastprompt.benchmarking.timing import sync as _sync
from fastprompt.ops.prefix_attention.eager import prefix_attention_eager
from fastprompt.ops.prefix_attention.reference import prefix_attention_reference

MiB = 2.0 ** 20
TARGET = 14.0


def saved_bytes(forward: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for the backward while ``forward()`` runs.

    Storages of ``exclude`` (parameters, buffers) are not counted. The forward's result (and so its graph) is
    kept until every storage is counted, so a freed buffer's address cannot be reused and miscounted.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in skip:
            seen[ptr] = max(seen.get(ptr, 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    total = sum(seen.values())
    del out
    return total


# ------------------------------------------------------------------------------------------- learners
LEARNERS = [
    pytest.param(BenchCase("coop", 100, n_ctx=16), id="coop-N100-M16"),
    pytest.param(BenchCase("cocoop", 100, batch=4), id="cocoop-B4xN100"),
]


def _text_forward(learner, feats):
    if learner.method == "cocoop":
        return lambda: learner.class_text_features(feats)
    return lambda: learner.class_text_features()


@pytest.mark.parametrize("case", LEARNERS)
def test_saved_memory_learner(benchmark, case):
    device = torch.device("cpu")
    learner, feats, _ = build_case(case, device, torch.float32)
    frozen = list(learner.parameters()) + list(learner.buffers())
    forward = _text_forward(learner, feats)
    learner.backend = "reference"
    ref = saved_bytes(forward, frozen)
    learner.backend = "auto"
    fast = saved_bytes(forward, frozen)
    benchmark.pedantic(forward, rounds=1, iterations=1)  # pytest-benchmark needs one timed call
    info = {
        "case": f"{case.method} N={case.classes} B={case.batch} M={learner.config.n_ctx}", "device": "cpu",
        "dtype": "float32", "reference_MiB": ref / MiB, "fast_MiB": fast / MiB, "ratio": ref / fast,
        "backend": learner.backend,
    }
    benchmark.extra_info.update(info)
    record(info)
    print(f"\n{info['case']}: reference {ref / MiB:.1f} MiB, fast {fast / MiB:.1f} MiB, {ref / fast:.1f}x")
    assert ref / fast >= TARGET, f"fast path saves {ref / fast:.1f}x less than the reference, below {TARGET}x"


# ------------------------------------------------------------------------------------------- the op
# name: (G, N, P, suffix lengths lo..hi); H = 8, dh = 64 (ViT-B/16 text tower), one layer
OP_SHAPES = {
    "coop": dict(G=1, N=100, P=17, lo=3, hi=14),
    "cocoop": dict(G=4, N=400, P=5, lo=3, hi=14),
}
H, DH = 8, 64


def _op_inputs(G, N, P, lo, hi):
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(lo, hi + 1, (N,), generator=gen)
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
    T = int(cu[-1])
    # the fused qkv projection's output, as the engine passes it (q / k / v are views of one buffer)
    qkv = torch.randn(T, 3, H, DH, generator=gen).requires_grad_(True)
    pre = torch.randn(2, G, H, P, DH, generator=gen).requires_grad_(True)
    g_idx = torch.arange(G).repeat_interleave(N // G)
    grad = torch.randn(T, H, DH, generator=gen)
    return qkv, pre, cu, g_idx, int(lengths.max()), grad


@pytest.mark.parametrize("shape", sorted(OP_SHAPES))
def test_saved_memory_prefix_attention(benchmark, shape):
    qkv, pre, cu, g_idx, S, grad = _op_inputs(**OP_SHAPES[shape])
    G, N = OP_SHAPES[shape]["G"], OP_SHAPES[shape]["N"]

    def run(fn):
        def forward():
            q, k, v = (qkv * 1).unbind(1)  # a non-leaf buffer, like the projection's output
            kp, vp = (pre * 1).unbind(0)
            return fn(q, k, v, kp, vp, cu, g_idx, S)

        return forward

    eager = lambda *a: prefix_attention_eager(*a, pairs_per_group=N // G)  # noqa: E731
    ref_bytes = saved_bytes(run(prefix_attention_reference))
    eager_bytes = saved_bytes(run(eager))
    # both count the (same-sized) qkv / prefix buffers they read; the difference is what each op adds
    inputs_bytes = (qkv.numel() + pre.numel()) * qkv.element_size()

    def step(fn):
        return lambda: torch.autograd.grad(run(fn)(), [qkv, pre], grad)

    want, got = step(prefix_attention_reference)(), step(eager)()
    err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want))
    assert err < 1e-5, f"eager backend disagrees with the reference: {err:.2e}"
    ref_ms = median_ms(step(prefix_attention_reference), torch.device("cpu"), rounds=5)
    benchmark.pedantic(step(eager), rounds=5, warmup_rounds=1, iterations=1)
    eager_ms = benchmark.stats.stats.median * 1e3
    info = {
        "case": f"prefix_attention {shape} G={G} N={N} P={OP_SHAPES[shape]['P']} T={qkv.shape[0]}", "device": "cpu",
        "dtype": "float32", "reference_MiB": ref_bytes / MiB, "fast_MiB": eager_bytes / MiB,
        "ratio": ref_bytes / eager_bytes, "inputs_MiB": inputs_bytes / MiB,
        "reference_ms": ref_ms, "fast_ms": eager_ms, "speedup": ref_ms / eager_ms, "max_rel_err": err,
    }
    benchmark.extra_info.update(info)
    record(info)
    print(f"\n{info['case']}: saved reference {ref_bytes / MiB:.2f} MiB, eager {eager_bytes / MiB:.2f} MiB "
          f"(inputs {inputs_bytes / MiB:.2f}); fwd+bwd reference {ref_ms:.1f} ms, eager {eager_ms:.1f} ms")
    _sync(torch.device("cpu"))
