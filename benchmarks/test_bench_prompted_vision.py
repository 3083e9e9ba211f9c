"""Prompted vision encoder and the VPT / VAPT learners: official reference vs fast path, same run.

Run: ``pytest benchmarks/test_bench_prompted_vision.py --benchmark-only``. On CUDA the towers are ViT-B/16
(open_clip ``ViT-B-16`` visual, timm ``vit_base_patch16_224``) at 224 px, batch 32; on a CPU a narrower ViT
(width 384, 6 blocks, 6 heads, 224 px / patch 16 = 197 tokens) at batch 2, so a CPU run takes a couple of
minutes. Random weights (no downloads): speed does not depend on them.

* ``encoder``: forward + backward of the prompted encoder w.r.t. the prompts (VPT-deep: N = 10 after CLS in
  every block; MaPLe / IVLP: N = 2 appended, deep up to block 8).
* ``learner``: one full training step of the timm classifiers (prompts + linear head, cross-entropy, backward):
  VPT-deep N = 10 and VAPT N = 10 (train mode: prompt / conv / MLP dropout live; the fast VAPT path uses the
  ``vapt_prompts`` op on the ``auto`` backend: Triton on CUDA, the eager op on the CPU).
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import median_ms, record
from fastprompt.benchmarking.timing import rel_err as _rel, sync as _sync
from fastprompt.encoders.prompted_vision import PromptedVisionEncoder


def _size(device):
    if device.type == "cuda":
        return dict(width=768, layers=12, heads=12, batch=32)
    return dict(width=384, layers=6, heads=6, batch=2)


def _open_clip_visual(device, dtype):
    from open_clip.transformer import VisionTransformer

    s = _size(device)
    torch.manual_seed(0)
    v = VisionTransformer(image_size=224, patch_size=16, width=s["width"], layers=s["layers"], heads=s["heads"],
                          mlp_ratio=4.0, output_dim=512)
    return v.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _timm_vit(device, dtype):
    import timm

    s = _size(device)
    torch.manual_seed(0)
    m = timm.create_model("vit_base_patch16_224", pretrained=False, embed_dim=s["width"], depth=s["layers"],
                          num_heads=s["heads"], num_classes=0)
    return m.to(device=device, dtype=dtype).eval()


ENCODER_CASES = {
    "vpt_deep_n10": dict(insert="after_cls", n=10, keys="all"),
    "maple_n2_depth9": dict(insert="append", n=2, keys=9),
}


def _run_and_compare(step, device, rounds, benchmark, set_fast):
    set_fast(False)
    ref_out, ref_grads = step()
    ref_ms = median_ms(step, device, rounds)
    set_fast(True)
    out, grads = step()
    err = max([_rel(out, ref_out)] + [_rel(a, b) for a, b in zip(grads, ref_grads)])
    assert err < 1e-4, f"fast path disagrees with the reference: {err:.2e}"
    benchmark.pedantic(lambda: (step(), _sync(device)), rounds=rounds, warmup_rounds=1)
    return ref_ms, benchmark.stats.stats.median * 1e3, err


@pytest.mark.parametrize("case", sorted(ENCODER_CASES))
def test_encoder_fwd_bwd(benchmark, case, device):
    cfg, dtype = ENCODER_CASES[case], torch.float32
    visual = _open_clip_visual(device, dtype)
    enc = PromptedVisionEncoder(visual, cfg["insert"])
    B, D, L = _size(device)["batch"], enc.width, enc.depth
    keys = range(L) if cfg["keys"] == "all" else range(min(cfg["keys"], L))
    gen = torch.Generator(device="cpu").manual_seed(0)
    prompts = {i: (torch.rand(cfg["n"], D, generator=gen) * 0.125 - 0.0625).to(device, dtype).requires_grad_()
               for i in keys}
    images = torch.randn(B, 3, 224, 224, generator=gen).to(device, dtype)
    upstream = torch.randn(B, visual.output_dim, generator=gen).to(device, dtype)
    mode = {"fast": False}

    def step():
        out = enc(images, prompts, fast=mode["fast"])
        return out.detach(), torch.autograd.grad((out * upstream).sum(), list(prompts.values()))

    rounds = 3 if device.type == "cpu" else 20
    ref_ms, fast_ms, err = _run_and_compare(step, device, rounds, benchmark, lambda f: mode.update(fast=f))
    info = {"bench": f"encoder {case}", "shape": f"B{B} D{D} L{L} 224px", "device": str(device), "dtype": "float32",
            "reference_ms": ref_ms, "fast_ms": fast_ms, "speedup": ref_ms / fast_ms, "max_rel_err": err}
    benchmark.extra_info.update(info)
    record(info)


@pytest.mark.parametrize("method", ["vpt_deep", "vapt"])
def test_learner_train_step(benchmark, method, device):
    from fastprompt.learners.vapt import VAPTClassifier
    from fastprompt.learners.vpt import VPTClassifier

    dtype = torch.float32
    vit = _timm_vit(device, dtype)
    if method == "vapt":
        clf = VAPTClassifier.from_timm(vit, 100, num_tokens=10)
        with torch.no_grad():  # off the zero init, so every generator tensor carries gradient
            for p in clf.prompts.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    else:
        clf = VPTClassifier.from_timm(vit, 100, num_tokens=10, deep=True, dropout=0.1)
    clf.train()
    B = _size(device)["batch"]
    gen = torch.Generator(device="cpu").manual_seed(1)
    images = torch.randn(B, 3, 224, 224, generator=gen).to(device, dtype)
    labels = torch.randint(0, 100, (B,), generator=gen).to(device)
    params = [p for p in clf.parameters() if p.requires_grad]

    def step():
        torch.manual_seed(0)  # the same dropout masks in both paths
        loss, logits = clf.compute_loss(images, labels)
        return logits.detach(), torch.autograd.grad(loss, params)

    def set_fast(fast):
        clf.backend = "auto" if fast else "reference"

    rounds = 3 if device.type == "cpu" else 20
    ref_ms, fast_ms, err = _run_and_compare(step, device, rounds, benchmark, set_fast)
    info = {"bench": f"learner {method} step", "shape": f"B{B} D{clf.encoder.width} L{clf.encoder.depth} N10",
            "device": str(device), "dtype": "float32", "reference_ms": ref_ms, "fast_ms": fast_ms,
            "speedup": ref_ms / fast_ms, "max_rel_err": err}
    benchmark.extra_info.update(info)
    record(info)
