"""KgCoOp, DePT(CoOp), CaPT(CoOp) and DeCaPT: one training step's text side, official reference vs fast engine.

Each case builds the learner on the ViT-B-16 architecture (random weights) with the first 100 Caltech101 class
names in float32, and times ``loss_from_features(v, class_text_features(v), labels)`` + the gradient of every
trainable tensor, on precomputed image features (the frozen image tower is the same on both paths). The last row
is CaPT's overhead over its CoOp baseline (M = 4 from "a photo of a"), both on the fast path.

Run: ``pytest benchmarks/test_bench_coop_family.py --benchmark-only``.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import median_ms, record
from fastprompt.benchmarking.timing import rel_err as _rel, sync as _sync

CLASSES, BATCH = 100, 4
CASES = [
    pytest.param("kgcoop", {}, id="kgcoop"),
    pytest.param("dept", {}, id="dept-coop"),
    pytest.param("capt", {}, id="capt-coop"),
    pytest.param("decapt", {}, id="decapt"),
]
_FAST_MS = {}


@pytest.fixture(scope="module")
def vitb16():
    import fastprompt

    torch.manual_seed(0)
    model, _, tokenizer = fastprompt.load_clip("ViT-B-16", pretrained=None)
    return model, tokenizer, fastprompt.load_classnames("caltech101")[:CLASSES]


def _build(name, kwargs, vitb16, device):
    import fastprompt

    model, tokenizer, names = vitb16
    model = model.to(device=device, dtype=torch.float32)
    if name in ("kgcoop", "capt", "decapt"):  # the template-using methods: Caltech101's template
        kwargs = {"dataset": "caltech101", **kwargs}
    learner = fastprompt.create_learner(name, model, names, tokenizer=tokenizer, **kwargs)
    learner.train()
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(BATCH, int(model.visual.output_dim), generator=gen).to(device)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=gen).to(device)
    params = [p for p in learner.parameters() if p.requires_grad]

    def step():
        torch.manual_seed(0)  # the same dropout masks on both paths (CaPT's MLP)
        loss, _ = learner.loss_from_features(v, learner.class_text_features(v), labels)
        return loss.detach(), torch.autograd.grad(loss, params)

    return learner, step


def _compare(fast, ref) -> float:
    return max([_rel(fast[0], ref[0])] + [_rel(f, r) for f, r in zip(fast[1], ref[1])])


@pytest.mark.parametrize("name,kwargs", CASES)
def test_coop_family_step(benchmark, name, kwargs, vitb16, device):
    learner, step = _build(name, kwargs, vitb16, device)
    cpu = device.type == "cpu"
    learner.backend = "reference"
    ref = step()  # warm-up and the values to compare against
    ref_ms = median_ms(step, device, rounds=1 if cpu else 5)
    learner.backend = "auto"
    fast = step()
    err = _compare(fast, ref)
    assert err < 1e-4, f"fast path disagrees with the reference: {err:.2e}"
    benchmark.pedantic(lambda: (step(), _sync(device)), rounds=3 if cpu else 20, warmup_rounds=1)
    fast_ms = benchmark.stats.stats.median * 1e3
    _FAST_MS[name] = fast_ms
    info = {
        "method": name, "classes": CLASSES, "batch": BATCH, "device": str(device), "dtype": "float32",
        "reference_ms": ref_ms, "fast_ms": fast_ms, "speedup": ref_ms / fast_ms, "max_rel_err": err,
        "backend": learner.backend,
    }
    benchmark.extra_info.update(info)
    record(info)


def test_capt_overhead_over_coop(benchmark, vitb16, device):
    """Fast CaPT(CoOp) step / fast CoOp step (M = 4 "a photo of a"), measured in this run."""
    coop, coop_step = _build("coop", {"n_ctx": 4, "ctx_init": "a photo of a"}, vitb16, device)
    coop.backend = "auto"
    benchmark.pedantic(lambda: (coop_step(), _sync(device)), rounds=3 if device.type == "cpu" else 20, warmup_rounds=1)
    coop_ms = benchmark.stats.stats.median * 1e3
    capt_ms = _FAST_MS.get("capt")
    if capt_ms is None:  # run alone: time CaPT here
        capt, capt_step = _build("capt", {}, vitb16, device)
        capt.backend = "auto"
        capt_step()
        capt_ms = median_ms(capt_step, device, rounds=3 if device.type == "cpu" else 20)
    info = {
        "method": "capt/coop fast ratio (ref col = coop ms, fast col = capt ms)", "classes": CLASSES, "batch": BATCH, "device": str(device),
        "dtype": "float32", "reference_ms": coop_ms, "fast_ms": capt_ms, "speedup": capt_ms / coop_ms,
        "max_rel_err": float("nan"), "backend": coop.backend,
    }
    benchmark.extra_info.update(info)
    record(info)
