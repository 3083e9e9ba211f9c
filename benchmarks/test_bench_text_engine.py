"""Text side forward+backward of CoOp and CoCoOp: official reference vs fast engine, same run.

Run: ``pytest benchmarks --benchmark-only``. On a CPU the reference takes seconds to minutes per step (it
encodes every class at 77 tokens); rounds are few on purpose.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import median_ms, record
from fastprompt.benchmarking.text import BenchCase, build_case, text_step
from fastprompt.benchmarking.timing import rel_err as _rel, sync as _sync

CASES = [
    pytest.param(BenchCase("coop", 100, dataset="caltech101"), id="coop-C100"),
    pytest.param(BenchCase("coop", 1000, dataset="imagenet"), id="coop-C1000"),
    pytest.param(BenchCase("cocoop", 100, batch=8, dataset="caltech101"), id="cocoop-B8xC100"),
]


@pytest.mark.parametrize("case", CASES)
def test_text_step(benchmark, case, device):
    dtype = torch.float32
    learner, feats, upstream = build_case(case, device, dtype)
    step = text_step(learner, feats, upstream)
    cpu = device.type == "cpu"

    learner.backend = "reference"
    ref_out, ref_grads = step()  # warm-up and the values to compare against
    ref_ms = median_ms(step, device, rounds=1 if cpu else 5)

    learner.backend = "auto"
    fast_out, fast_grads = step()
    err = max([_rel(fast_out, ref_out)] + [_rel(f, r) for f, r in zip(fast_grads, ref_grads)])
    assert err < 1e-4, f"fast path disagrees with the reference: {err:.2e}"
    benchmark.pedantic(lambda: (step(), _sync(device)), rounds=3 if cpu else 20, warmup_rounds=1)
    fast_ms = benchmark.stats.stats.median * 1e3

    info = {
        "method": case.method, "classes": case.classes, "batch": case.batch, "device": str(device),
        "dtype": "float32", "reference_ms": ref_ms, "fast_ms": fast_ms, "speedup": ref_ms / fast_ms,
        "max_rel_err": err, "backend": learner.backend,
    }
    benchmark.extra_info.update(info)
    record(info)


@pytest.mark.parametrize("case", CASES)
def test_text_step_compiled(benchmark, case, device):
    """The same step three ways in one run: reference, eager fast engine, fast engine through torch.compile
    (inductor; CUDA graphs on a GPU). Compilation is the untimed warm-up."""
    import fastprompt

    learner, feats, upstream = build_case(case, device, torch.float32)
    step = text_step(learner, feats, upstream)
    cpu = device.type == "cpu"
    learner.backend = "reference"
    ref_out, ref_grads = step()
    ref_ms = median_ms(step, device, rounds=1 if cpu else 5)
    learner.backend = "auto"
    step()
    fast_ms = median_ms(step, device, rounds=3 if cpu else 20)
    fastprompt.compile(learner)
    out, grads = step()  # compiles
    err = max([_rel(out, ref_out)] + [_rel(f, r) for f, r in zip(grads, ref_grads)])
    assert err < 1e-4, f"compiled fast path disagrees with the reference: {err:.2e}"
    benchmark.pedantic(lambda: (step(), _sync(device)), rounds=3 if cpu else 20, warmup_rounds=1)
    compiled_ms = benchmark.stats.stats.median * 1e3
    info = {"method": case.method, "classes": case.classes, "batch": case.batch, "device": str(device),
            "dtype": "float32", "reference_ms": ref_ms, "fast_ms": fast_ms, "compiled_ms": compiled_ms,
            "speedup": ref_ms / fast_ms, "compiled_speedup": ref_ms / compiled_ms, "max_rel_err": err}
    benchmark.extra_info.update(info)
    record(info)
