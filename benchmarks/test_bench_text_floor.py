"""The text engine against its physical floor: the configurations and targets of the GPU tuning issue.

Run on a GPU: ``pytest benchmarks/test_bench_text_floor.py --benchmark-only`` (``benchmarks/run_gpu.sh`` runs it
with the other benchmarks). Each case is a text-side training step as the trainer runs it under bf16 autocast on
an fp32 ViT-B-16 (random weights): the prompts (for CoCoOp the meta-net conditioning on each image), the text
tower forward + backward, logits against B fixed normalised image features, cross-entropy, gradients of every
trainable tensor. Reference (the official 77-token path) and fast path in the same run, each with its peak
memory; the floor is the prefix-shared text floor of the roofline model (``docs/design.md``, speed contract) for an H100 (bf16, 798
TFLOP/s, 3.0 TB/s), reported only on an H100 / H200.

* CoOp, N = 1000 ImageNet classes, M = 16, B = 32: target >= 10x the reference, <= 3x the floor (1.22 ms).
* CoCoOp, B = 32 x N = 100 (Caltech101), M = 4: target >= 20x, <= 3x the floor (4.29 ms).
* CoCoOp, B = 32 x N = 1000 (ImageNet), M = 4: the fast path must fit in the GPU's memory; the reference does not
  fit (the floor model: ~306 GB of activations), so it is not run: its memory need is extrapolated from its measured
  peak at N = 100 (activations grow linearly in B x N), and the row says so.

On a CPU the same code runs at toy sizes in float32 (a smoke test of the harness; no floors, no targets).
"""
from __future__ import annotations

from typing import Dict, Optional

import pytest
import torch

from benchmarks.conftest import median_ms, record
from fastprompt.benchmarking.text import BenchCase, build_case, classification_step
from fastprompt.benchmarking.timing import rel_err as _rel, sync as _sync

# (case, prefix-shared floor in ms on an H100 (roofline model), speed-up target, floor-multiple target)
GPU_CASES = {
    "coop-N1000": (BenchCase("coop", 1000, batch=32, dataset="imagenet", n_ctx=16), 1.22, 10.0, 3.0),
    "cocoop-B32xN100": (BenchCase("cocoop", 100, batch=32, dataset="caltech101", n_ctx=4), 4.29, 20.0, 3.0),
    "cocoop-B32xN1000": (BenchCase("cocoop", 1000, batch=32, dataset="imagenet", n_ctx=4), 37.3, None, None),
}
CPU_CASES = {
    "coop-N1000": (BenchCase("coop", 20, batch=4, dataset="imagenet", n_ctx=16), None, None, None),
    "cocoop-B32xN100": (BenchCase("cocoop", 10, batch=2, dataset="caltech101", n_ctx=4), None, None, None),
    "cocoop-B32xN1000": (BenchCase("cocoop", 20, batch=2, dataset="imagenet", n_ctx=4), None, None, None),
}
# The reference whose memory need is extrapolated instead of run: (case id, measured case id).
EXTRAPOLATED = {"cocoop-B32xN1000": "cocoop-B32xN100"}
_REFERENCE_PEAK_MB: Dict[str, float] = {}


def _on_h100_class(device: torch.device) -> bool:
    return device.type == "cuda" and any(k in torch.cuda.get_device_name(device) for k in ("H100", "H200"))


def _peak(fn, device) -> Optional[float]:
    if device.type != "cuda":
        fn()
        return None
    _sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


@pytest.mark.parametrize("case_id", list(GPU_CASES))
def test_text_floor(benchmark, case_id, device):
    gpu = device.type == "cuda"
    case, floor_ms, speedup_target, floor_target = (GPU_CASES if gpu else CPU_CASES)[case_id]
    if not _on_h100_class(device):
        floor_ms = speedup_target = floor_target = None  # the floor figures are for an H100
    learner, feats, _ = build_case(case, device, torch.float32)
    labels = torch.arange(case.batch, device=device) % case.classes
    step = classification_step(learner, feats, labels, amp=gpu)
    rounds = 10 if gpu else 1
    row = {"bench": f"text floor {case_id}", "shape": f"ViT-B-16 text, {case.method} M{learner.config.n_ctx} "
           f"B{case.batch} N{case.classes}", "device": str(device), "dtype": "bf16-autocast" if gpu else "float32"}

    ref_out = ref_ms = ref_mb = None
    ref_note = "measured"
    if gpu and case_id in EXTRAPOLATED:
        measured = _REFERENCE_PEAK_MB.get(EXTRAPOLATED[case_id])
        base_case = GPU_CASES[EXTRAPOLATED[case_id]][0]
        scale = (case.batch * case.classes) / (base_case.batch * base_case.classes)
        ref_mb = None if measured is None else measured * scale
        ref_note = f"not run (does not fit); memory need extrapolated x{scale:g} from {EXTRAPOLATED[case_id]}"
    else:
        learner.backend = "reference"
        try:
            ref_mb = _peak(lambda: step(), device)
            ref_out = step()
            ref_ms = median_ms(step, device, rounds=rounds)
            _REFERENCE_PEAK_MB[case_id] = ref_mb if ref_mb is not None else 0.0
        except torch.cuda.OutOfMemoryError:
            ref_out, ref_ms, ref_note = None, None, "out of memory"
            torch.cuda.empty_cache()

    learner.backend = "auto"
    fast_mb = _peak(lambda: step(), device)
    fast_out = step()
    if ref_out is not None:
        err = max([_rel(fast_out[0], ref_out[0])] + [_rel(f, r) for f, r in zip(fast_out[1], ref_out[1])])
        # fp32 (CPU) is the exact contract; under bf16 autocast both paths round differently, so this only
        # guards against timing a broken path (tests/learners/test_gpu_learners.py holds the bf16 bound).
        assert err < (1e-4 if not gpu else 1e-1), f"fast path disagrees with the reference: {err:.2e}"
        row["max_rel_err"] = err
    benchmark.pedantic(lambda: (step(), _sync(device)), rounds=rounds * 2, warmup_rounds=2)
    fast_ms = benchmark.stats.stats.median * 1e3

    row.update(reference_ms=ref_ms, fast_ms=fast_ms, speedup=None if ref_ms is None else ref_ms / fast_ms,
               reference_peak_mb=ref_mb, fast_peak_mb=fast_mb, reference=ref_note, floor_ms=floor_ms,
               times_floor=None if floor_ms is None else fast_ms / floor_ms, backend=learner.backend)
    if speedup_target is not None and ref_ms is not None:
        row["speedup_target_met"] = ref_ms / fast_ms >= speedup_target
    if floor_target is not None:
        row["floor_target_met"] = fast_ms / floor_ms <= floor_target
    if gpu:
        total = torch.cuda.get_device_properties(device).total_memory / 2**20
        row["fits_in_gpu"] = fast_mb is not None and fast_mb <= total
    benchmark.extra_info.update(row)
    record(row)
