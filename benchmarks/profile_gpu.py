"""Profile one text-side training step of the GPU issue's cases: time, top kernels, host syncs, peak memory.

    python benchmarks/profile_gpu.py --out DIR            # on CUDA: CoCoOp B=32 x N=100, CoOp N=1000 (bf16 autocast)
    python benchmarks/profile_gpu.py --out DIR --dry-run  # on the CPU at toy sizes: checks the plumbing only

Per case and path (reference, fast eager, fast compiled when ``--compile``), writes ``DIR/profile_<case>.json``:
the median time of 10 steps (CUDA events on a GPU, wall clock on the CPU), the top-30 kernels of one step
(torch.profiler, by device time on a GPU, CPU time otherwise), the host syncs of one step (CUDA's sync debug
mode "warn", its warnings counted), and the peak memory of one step. A step is the text side as the trainer
runs it: prompts (CoCoOp: the meta-net on each image), text tower forward + backward, logits against fixed
normalised image features, cross-entropy, gradients of every trainable tensor.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastprompt.benchmarking.text import BenchCase, build_case, classification_step  # noqa: E402

GPU_CASES = {
    "cocoop-B32xN100": BenchCase("cocoop", 100, batch=32, dataset="caltech101", n_ctx=4),
    "coop-N1000": BenchCase("coop", 1000, batch=32, dataset="imagenet", n_ctx=16),
}
DRY_CASES = {
    "cocoop-B32xN100": BenchCase("cocoop", 3, batch=2, dataset="caltech101", n_ctx=4),
    "coop-N1000": BenchCase("coop", 4, batch=2, dataset="imagenet", n_ctx=16),
}


def time_steps(step, device: torch.device, n: int) -> float:
    """Median ms of ``n`` steps (CUDA events on a GPU)."""
    times = []
    for _ in range(n):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def top_kernels(step, device: torch.device, k: int = 30):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    key = "device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = sorted(events, key=lambda e: getattr(e, key, 0.0), reverse=True)[:k]
    launches = sum(e.count for e in events if device.type == "cuda" and getattr(e, "device_type", None) is not None
                   and str(e.device_type).endswith("CUDA"))
    return [{"name": e.key, "count": e.count, "time_us": getattr(e, key, 0.0)} for e in rows], launches


def count_syncs(step, device: torch.device):
    """Host syncs of one step: CUDA's sync debug mode warns at each; None on the CPU (no such thing)."""
    if device.type != "cuda":
        step()
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            torch.cuda.current_stream(device).query()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
    return {"count": len(syncs), "first": syncs[:5]}


def peak_mb(step, device: torch.device):
    if device.type != "cuda":
        step()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def profile_case(name: str, case: BenchCase, device: torch.device, steps: int, paths) -> dict:
    import fastprompt

    model = tokenizer = None
    if device.type == "cpu":  # the dry run: a toy CLIP (2 text layers, width 64) instead of ViT-B-16
        import open_clip

        torch.manual_seed(0)
        model = open_clip.CLIP(embed_dim=48, vision_cfg=open_clip.CLIPVisionCfg(layers=1, width=64, patch_size=16,
                                                                              image_size=32),
                               text_cfg=open_clip.CLIPTextCfg(width=64, heads=4, layers=2))
        tokenizer = open_clip.get_tokenizer("ViT-B-16")
    learner, feats, _ = build_case(case, device, torch.float32, model=model, tokenizer=tokenizer)
    labels = torch.arange(case.batch, device=device) % case.classes
    amp = device.type == "cuda"
    result = {"case": name, "device": torch.cuda.get_device_name(device) if amp else "cpu",
              "torch": torch.__version__, "dtype": "bf16-autocast" if amp else "float32",
              "classes": case.classes, "batch": case.batch, "n_ctx": learner.config.n_ctx, "paths": {}}
    for path in paths:
        learner.backend = "reference" if path == "reference" else "auto"
        # The dry run checks the compile plumbing with dynamo alone (no code generation: seconds, not minutes).
        options = {"backend": "eager"} if device.type == "cpu" else {"mode": "auto"}
        fastprompt.compile(learner, options if path == "compiled" else False)
        step = classification_step(learner, feats, labels, amp)
        step()  # warm-up (and compilation)
        step()
        row = {"backend": learner.backend, "median_ms": time_steps(step, device, steps)}
        row["top_kernels"], row["cuda_kernel_launches"] = top_kernels(step, device)
        row["syncs"] = count_syncs(step, device)
        row["peak_mb"] = peak_mb(step, device)
        result["paths"][path] = row
        print(f"{name} {path}: {row['median_ms']:.2f} ms, peak {row['peak_mb']} MiB, syncs {row['syncs']}", flush=True)
    fastprompt.compile(learner, False)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for profile_<case>.json")
    ap.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU (plumbing check)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per path (default 10)")
    ap.add_argument("--cases", default=",".join(GPU_CASES), help="comma-separated case names")
    ap.add_argument("--paths", default="reference,fast,compiled", help="comma-separated: reference, fast, compiled")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("profile_gpu.py: no CUDA device (use --dry-run on the CPU)", file=sys.stderr)
        return 2
    table = DRY_CASES if args.dry_run else GPU_CASES
    paths = [p for p in args.paths.split(",") if p]
    bad = [p for p in paths if p not in ("reference", "fast", "compiled")] + \
          [c for c in args.cases.split(",") if c not in table]
    if bad:
        print(f"profile_gpu.py: unknown path/case {bad}; paths: reference, fast, compiled; cases: {', '.join(table)}",
              file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    steps = 2 if args.dry_run else args.steps
    cases = args.cases.split(",")
    if args.dry_run and args.cases == ",".join(GPU_CASES):
        cases = ["coop-N1000"]  # one case exercises every code path; keeps the dry run short
    for name in cases:
        result = profile_case(name, table[name], device, steps, paths)
        with open(os.path.join(args.out, f"profile_{name}.json"), "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
