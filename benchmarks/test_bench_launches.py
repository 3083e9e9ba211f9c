"""Kernel launches of one text-side training step, official reference vs fast engine (same run).

A step: the class text features (CoCoOp: conditioned on B images), logits against fixed normalised image
features, their backward to every trainable tensor. On a GPU the count is the CUDA kernels the profiler sees;
on the CPU it is the aten ops that compute (the leaves of the profiler's op tree, without views and other
metadata-only ops), the launches those kernels would be. Rows in float32 and under bf16 autocast (autocast adds
the casts of the frozen weights).

Run: ``pytest benchmarks/test_bench_launches.py --benchmark-only -s``.
"""
from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.conftest import record
from fastprompt.benchmarking.text import BenchCase, build_case, text_step

# Ops that only make a new view or touch metadata: no kernel runs for them.
METADATA_OPS = {
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::transpose", "aten::t",
    "aten::permute", "aten::expand", "aten::expand_as", "aten::unsqueeze", "aten::squeeze", "aten::select",
    "aten::slice", "aten::split", "aten::split_with_sizes", "aten::chunk", "aten::unbind", "aten::narrow",
    "aten::detach", "aten::detach_", "aten::alias", "aten::_unsafe_view", "aten::empty", "aten::empty_like",
    "aten::empty_strided", "aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh", "aten::view_as",
    "aten::movedim", "aten::flatten", "aten::unflatten", "aten::contiguous", "aten::result_type",
    "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense", "aten::set_", "aten::numpy_T", "aten::dim",
    "aten::size", "aten::stride", "aten::is_same_size", "aten::_has_compatible_shallow_copy_type",
    "aten::resize_",  # allocation only
    "aten::to",  # a leaf `to` is a no-op (a real conversion shows as _to_copy -> copy_, counted there)
}

CASES = [
    pytest.param(BenchCase("coop", 20, batch=4, dataset="imagenet", n_ctx=16), id="coop-C20"),
    pytest.param(BenchCase("cocoop", 10, batch=4, dataset="caltech101", n_ctx=4), id="cocoop-B4xC10"),
]


def count_launches(fn, device: torch.device):
    """(launches of ``fn()``, Counter of them by name): CUDA kernels on a GPU, computing aten leaf ops on the CPU."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    counts = Counter()
    for e in prof.events():
        if device.type == "cuda":
            if str(getattr(e, "device_type", "")).endswith("CUDA"):
                counts[e.name] += 1
            continue
        if not e.name.startswith("aten::") or e.name in METADATA_OPS:
            continue
        if any(c.name.startswith("aten::") for c in e.cpu_children):
            continue  # a composite op: its children are the kernels
        counts[e.name] += 1
    return sum(counts.values()), counts


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
@pytest.mark.parametrize("case", CASES)
def test_launch_count(benchmark, case, precision, device):
    learner, feats, upstream = build_case(case, device, torch.float32)
    step = text_step(learner, feats, upstream)
    amp = precision != "fp32"

    def run():
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with ctx:
            return step()

    row = {"bench": "launches per text step", "case": f"{case.method} B{case.batch} N{case.classes} M{case.n_ctx}",
           "precision": precision, "device": str(device)}
    top = {}
    for path in ("reference", "fast"):
        learner.backend = "reference" if path == "reference" else "auto"
        run()  # warm-up: layouts, lazy imports
        row[f"{path}_launches"], counts = count_launches(run, device)
        top[path] = counts.most_common(8)
    row["fast_over_reference"] = row["fast_launches"] / row["reference_launches"]
    benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    benchmark.extra_info.update(row)
    record(row)
    print(row, "\n  reference top:", top["reference"], "\n  fast top:", top["fast"])
