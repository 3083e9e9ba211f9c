"""``fastprompt bench``: the text side of a training step, official reference vs fast path, in one run.

Each case builds a learner on a real architecture with random weights and shipped class names, then times
forward + backward of the text side (for CoCoOp: meta-net, B x C prompts, logits) under both backends on the
same parameters, and reports the speed-up and the largest relative error of outputs and gradients.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

import fastprompt
from fastprompt.benchmarking.timing import markdown_table, rel_err, sync

__all__ = ["BenchCase", "BenchResult", "DEFAULT_CASES", "text_step", "classification_step", "build_case", "run_case", "run_cases",
           "format_table", "results_json"]


@dataclass
class BenchCase:
    method: str  # "coop" | "cocoop"
    classes: int  # C: the first C names of `dataset`
    batch: int = 1  # B images (CoCoOp conditions the prompts on each)
    dataset: str = "imagenet"
    n_ctx: Optional[int] = None  # None: the method's default
    model: str = "ViT-B-16"


@dataclass
class BenchResult:
    method: str
    classes: int
    batch: int
    device: str
    dtype: str
    reference_ms: float
    fast_ms: float
    speedup: float
    max_rel_err: float
    fast_backend: str


# The embedded default: finishes in about a minute on a 2-core CPU.
DEFAULT_CASES = [BenchCase("coop", 100), BenchCase("cocoop", 100, batch=2)]


def text_step(learner, image_features: torch.Tensor, upstream: torch.Tensor) -> Callable[[], tuple]:
    """A closure running forward + backward of the learner's text side; returns (output, grads)."""
    params = [p for p in learner.parameters() if p.requires_grad]

    def step():
        if learner.method == "cocoop":
            text = learner.text_features(image_features)  # [B, C, E]
            out = learner.logit_scale * torch.einsum("be,bce->bc", image_features, text)
        else:
            text = learner.encode_text()  # [C, E]
            out = learner.logit_scale * image_features @ text.t()
        grads = torch.autograd.grad((out * upstream).sum(), params)
        return out.detach(), grads

    return step


def classification_step(learner, image_features: torch.Tensor, labels: torch.Tensor, amp: bool):
    """A closure running the text side as the trainer does: logits against ``image_features`` [B, E], cross-entropy
    with ``labels`` [B], forward + backward (bf16 autocast when ``amp``) -> (loss, grads)."""
    params = [p for p in learner.parameters() if p.requires_grad]
    device = image_features.device

    def step():
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with ctx:
            if learner.method == "cocoop":
                text = learner.text_features(image_features)  # [B, C, E], conditioned on each image
                logits = learner.logit_scale * torch.einsum("be,bce->bc", image_features, text)
            else:
                text = learner.encode_text()  # [C, E]
                logits = learner.logit_scale * image_features @ text.t()
            loss = F.cross_entropy(logits.float(), labels)
        return loss.detach(), torch.autograd.grad(loss, params)

    return step


def _time(fn: Callable, device: torch.device, repeats: int, warmup: int):
    """(median ms over `repeats` timed calls after `warmup` untimed ones, the last call's result)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times, result = [], None
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), result


def build_case(case: BenchCase, device: torch.device, dtype: torch.dtype, model=None, tokenizer=None):
    """(learner, image_features, upstream gradient) for a case, with random weights."""
    if model is None:
        model, _, tokenizer = fastprompt.load_clip(case.model, pretrained=None)
    model = model.to(device=device, dtype=dtype)
    names = fastprompt.load_classnames(case.dataset)
    if case.classes > len(names):
        raise ValueError(f"{case.dataset} has {len(names)} classes, asked for {case.classes}")
    kwargs = {} if case.n_ctx is None else {"n_ctx": case.n_ctx}
    learner = fastprompt.create_learner(case.method, model, names[: case.classes], tokenizer=tokenizer, **kwargs)
    learner.train()
    gen = torch.Generator().manual_seed(0)
    embed_dim = int(model.visual.output_dim)
    image_features = F.normalize(torch.randn(case.batch, embed_dim, generator=gen), dim=-1).to(device, dtype)
    upstream = torch.randn(case.batch, case.classes, generator=gen).to(device, dtype)
    return learner, image_features, upstream


def run_case(
    case: BenchCase,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    repeats: int = 1,
    warmup: int = 1,
    fast_backend: str = "auto",
    model=None,
    tokenizer=None,
) -> BenchResult:
    device = torch.device(device)
    learner, feats, upstream = build_case(case, device, dtype, model, tokenizer)
    step = text_step(learner, feats, upstream)
    # The reference takes seconds per step on a CPU: its first timed call doubles as its warm-up.
    learner.backend = "reference"
    ref_ms, (ref_out, ref_grads) = _time(step, device, repeats, warmup=max(warmup - 1, 0))
    learner.backend = fast_backend
    fast_ms, (fast_out, fast_grads) = _time(step, device, repeats, warmup=warmup)
    err = max([rel_err(fast_out, ref_out)] + [rel_err(f, r) for f, r in zip(fast_grads, ref_grads)])
    return BenchResult(
        case.method, case.classes, case.batch, _device_name(device), str(dtype).replace("torch.", ""),
        ref_ms, fast_ms, ref_ms / fast_ms, err, learner.backend,
    )


def run_cases(cases: List[BenchCase], device="cpu", dtype=torch.float32, repeats=1, warmup=1, progress=print):
    """Every case on one ViT-B-16 (random weights) -> [BenchResult]."""
    model, _, tokenizer = fastprompt.load_clip("ViT-B-16", pretrained=None)
    results = []
    for case in cases:
        if progress:
            progress(f"running {case.method} C={case.classes} B={case.batch} on {device} ...")
        use = model if case.model == "ViT-B-16" else None
        results.append(run_case(case, device, dtype, repeats, warmup, model=use, tokenizer=tokenizer if use else None))
    return results


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu x{torch.get_num_threads()}"


def format_table(results: List[BenchResult]) -> str:
    head = ["method", "classes", "batch", "device", "dtype", "reference ms", "fast ms", "speed-up", "max rel err"]
    rows = [
        [r.method, str(r.classes), str(r.batch), r.device, r.dtype, f"{r.reference_ms:.1f}", f"{r.fast_ms:.1f}",
         f"{r.speedup:.1f}x", f"{r.max_rel_err:.1e}"]
        for r in results
    ]
    return markdown_table(head, rows)


def results_json(results: List[BenchResult]) -> str:
    return json.dumps([dataclasses.asdict(r) for r in results], indent=2)
