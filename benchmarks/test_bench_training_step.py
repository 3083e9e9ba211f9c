"""Whole training steps and evaluation throughput: official reference vs fast path, same run.

Run: ``pytest benchmarks/test_bench_training_step.py --benchmark-only``.

* ``test_clip_train_step``: one optimisation step of a CLIP prompt learner exactly as the Trainer runs it, on
  images already on the device: ``compute_loss`` (prompted or frozen image tower, text side, loss) under
  autocast, ``backward``, ``optimizer.step()`` (SGD, momentum 0.9, weight decay 5e-4, Dassl's). CUDA: the
  ViT-B-16 architecture (random weights: speed does not depend on them), the first 100 ImageNet class names,
  the method's official batch size, bf16 autocast. CPU: the real ViT-B-16 text tower with a narrow image tower
  (width 128, 12 blocks as ViT-B/16 so MaPLe/PromptSRC keep their official depth 9, 64 px), 10 classes, batch 2, float32, so a CPU run stays within a few minutes.
* ``test_timm_train_step``: the same for VPT-deep / VAPT (N = 10 prompts) on a timm ViT-B/16 classifier
  (``vit_base_patch16_224``, pretrained=False), 100 classes, batch 64 (CPU: width 192, 4 blocks, 10 classes,
  batch 2).
* ``test_eval_throughput``: images/s of ``learner(images)`` in eval mode under ``no_grad``: the fast path
  encodes the class prompts once and reuses them (``cached_text_features``), the reference re-encodes all of
  them at 77 tokens for every batch, as the official test loop does. CUDA: ViT-B-16, 100 classes, batch 100
  (the Dassl test batch); CPU: the CPU model above, 10 classes, batch 2.

Each row checks the fast step against the reference step from the same state (loss and every gradient) before
timing, and on CUDA records peak memory (``torch.cuda.max_memory_allocated``) of each path.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict

import pytest
import torch

from benchmarks.conftest import first_call_ms, record
from fastprompt.benchmarking.timing import rel_err as _rel, sync as _sync
from fastprompt.benchmarking.step import TrainStep, _image_size

CLIP_METHODS = ["coop", "cocoop", "kgcoop", "dept", "capt", "maple", "promptsrc", "dpc", "softcpt"]
SOFTCPT_TASKS = 4  # the 100 (CPU: 10) classes read as 4 (CPU: 2) tasks of consecutive classes
CPU_VISION = {"width": 128, "layers": 12, "image_size": 64, "patch_size": 16}  # CPU image tower (2 heads of 64)


def _sizes(device: torch.device) -> Dict[str, object]:
    if device.type == "cuda":
        return {"classes": 100, "batch": None, "timm_batch": 64, "eval_batch": 100, "dtype": "bf16-autocast",
                "timm": {}, "rounds": 10}
    return {"classes": 10, "batch": 2, "timm_batch": 2, "eval_batch": 2, "dtype": "float32",
            "timm": {"embed_dim": 192, "depth": 4, "num_heads": 3}, "rounds": 1}


def _arch(device: torch.device) -> str:
    return "ViT-B-16" if device.type == "cuda" else "ViT-B-16 text + {width}w{layers}L {image_size}px vision".format(**CPU_VISION)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _peak_reset(device):
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device):
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


@pytest.fixture(scope="module")
def vitb16(device):
    import fastprompt

    torch.manual_seed(0)
    if device.type == "cuda":
        model, _, tokenizer = fastprompt.load_clip("ViT-B-16", pretrained=None)
    else:  # the real ViT-B-16 text tower (what the fast path changes) with a small 64 px image tower
        import open_clip

        cfg = open_clip.get_model_config("ViT-B-16")
        vision = dict(cfg["vision_cfg"], **CPU_VISION)
        model = open_clip.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=vision, text_cfg=cfg["text_cfg"])
        tokenizer = open_clip.get_tokenizer("ViT-B-16")
    model = model.to(device=device, dtype=torch.float32).eval()
    names = fastprompt.load_classnames("imagenet")[: _sizes(device)["classes"]]
    return model, tokenizer, names


def _clip_learner(method: str, vitb16, device):
    from fastprompt.benchmarking.step import step_learner
    from fastprompt.training.config import method_defaults

    model, tokenizer, names = vitb16
    tasks = SOFTCPT_TASKS if device.type == "cuda" else 2
    learner = step_learner(method, model, tokenizer, names, device, tasks=tasks)
    batch = _sizes(device)["batch"] or int(method_defaults(method)["batch_size"])
    return learner, batch, len(names)


def _train_step(learner, images, labels, device) -> TrainStep:
    return TrainStep(learner, images, labels, amp_dtype=torch.bfloat16 if device.type == "cuda" else None)


def _compare_then_time(step: TrainStep, set_backend: Callable[[str], None], benchmark, device, rounds: int):
    """(reference ms, fast ms, max rel err, ref peak MB, fast peak MB)."""
    err = step.compare(set_backend)
    # fp32 (CPU): the exact contract. bf16 autocast (CUDA): both paths are rounded, differently, so this is only
    # a guard against timing a broken path (O(1) error); tests/learners/test_gpu_learners.py holds the bf16 bound.
    assert err < (1e-4 if device.type == "cpu" else 1e-1), f"fast path disagrees with the reference: {err:.2e}"

    set_backend("reference")
    _peak_reset(device)
    _, ref_ms = first_call_ms(step, device, gpu_rounds=rounds)
    ref_mb = _peak_mb(device)
    step.restore()
    set_backend("auto")
    _peak_reset(device)
    benchmark.pedantic(lambda: (step(), _sync(device)), rounds=rounds + 1, warmup_rounds=1)
    fast_mb = _peak_mb(device)
    step.restore()
    return ref_ms, benchmark.stats.stats.median * 1e3, err, ref_mb, fast_mb


def _row(bench, shape, device, ref_ms, fast_ms, err, ref_mb, fast_mb, **extra):
    row = {"bench": bench, "shape": shape, "device": str(device), "dtype": _sizes(device)["dtype"],
           "reference_ms": ref_ms, "fast_ms": fast_ms, "speedup": ref_ms / fast_ms, "max_rel_err": err}
    if ref_mb is not None:
        row.update(reference_peak_mb=ref_mb, fast_peak_mb=fast_mb)
    row.update(extra)
    return row


@pytest.mark.parametrize("method", CLIP_METHODS)
def test_clip_train_step(benchmark, method, vitb16, device):
    learner, batch, classes = _clip_learner(method, vitb16, device)
    gen = torch.Generator().manual_seed(1)
    px = _image_size(vitb16[0])
    images = torch.randn(batch, 3, px, px, generator=gen).to(device)
    labels = (torch.arange(batch) * 7 % classes).to(device)  # distinct labels while batch <= classes (DPC)
    step = _train_step(learner, images, labels, device)

    def set_backend(b):
        learner.backend = b

    s = _sizes(device)
    ref_ms, fast_ms, err, ref_mb, fast_mb = _compare_then_time(step, set_backend, benchmark, device, s["rounds"])
    row = _row(f"train step {method}", f"{_arch(device)} C{classes} B{batch}", device, ref_ms, fast_ms, err, ref_mb, fast_mb,
               images_per_s_fast=batch / fast_ms * 1e3)
    benchmark.extra_info.update(row)
    record(row)


@pytest.mark.parametrize("method", ["vpt_deep", "vapt"])
def test_timm_train_step(benchmark, method, device):
    import timm

    from fastprompt.learners.vapt import VAPTClassifier
    from fastprompt.learners.vpt import VPTClassifier

    s = _sizes(device)
    classes = s["classes"]
    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **s["timm"])
    vit = vit.to(device).eval()
    if method == "vapt":
        clf = VAPTClassifier.from_timm(vit, classes, num_tokens=10)
        with torch.no_grad():  # off the zero init, so every generator tensor carries gradient
            for p in clf.prompts.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    else:
        clf = VPTClassifier.from_timm(vit, classes, num_tokens=10, deep=True, dropout=0.1)
    clf = clf.to(device).train()
    B = s["timm_batch"]
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(B, 3, 224, 224, generator=gen).to(device)
    labels = torch.randint(0, classes, (B,), generator=gen).to(device)
    step = _train_step(clf, images, labels, device)

    def set_backend(b):
        clf.backend = b

    ref_ms, fast_ms, err, ref_mb, fast_mb = _compare_then_time(step, set_backend, benchmark, device, s["rounds"])
    shape = f"timm ViT D{clf.encoder.width} L{clf.encoder.depth} C{classes} B{B} N10"
    row = _row(f"train step {method}", shape, device, ref_ms, fast_ms, err, ref_mb, fast_mb,
               images_per_s_fast=B / fast_ms * 1e3)
    benchmark.extra_info.update(row)
    record(row)


def test_eval_throughput(benchmark, vitb16, device):
    """CoOp evaluation: cached class features (fast) vs re-encoding every class per batch (reference)."""
    import fastprompt

    model, tokenizer, names = vitb16
    torch.manual_seed(0)
    learner = fastprompt.create_learner("coop", model, list(names), tokenizer=tokenizer).to(device).eval()
    B = _sizes(device)["eval_batch"]
    px = _image_size(model)
    images = torch.randn(B, 3, px, px, generator=torch.Generator().manual_seed(2)).to(device)
    rounds = _sizes(device)["rounds"]

    def run():
        with torch.no_grad(), _autocast(device):
            return learner(images).float()

    learner.backend = "reference"
    _peak_reset(device)
    ref_logits, ref_ms = first_call_ms(run, device, gpu_rounds=rounds)
    ref_mb = _peak_mb(device)
    learner.backend = "auto"  # resets the text cache: the first fast call encodes the classes once
    fast_logits = run()
    err = _rel(fast_logits, ref_logits)
    assert err < (1e-4 if device.type == "cpu" else 5e-2), f"fast path disagrees with the reference: {err:.2e}"
    _peak_reset(device)
    benchmark.pedantic(lambda: (run(), _sync(device)), rounds=rounds + 1, warmup_rounds=1)
    fast_mb = _peak_mb(device)
    fast_ms = benchmark.stats.stats.median * 1e3
    row = _row("eval coop (cached text)", f"{_arch(device)} C{len(names)} B{B}", device, ref_ms, fast_ms, err, ref_mb, fast_mb,
               images_per_s_reference=B / ref_ms * 1e3, images_per_s_fast=B / fast_ms * 1e3)
    benchmark.extra_info.update(row)
    record(row)
