"""``fastprompt selftest``: check an installation in seconds, on whatever it has.

Builds a small real open_clip CLIP (random weights, no download), then for CoOp and CoCoOp compares the fast
path on every available backend against the official reference: logits and the gradients of every trainable
tensor, in float64. Exits non-zero on any disagreement.
"""
from __future__ import annotations

import logging
import os
from typing import List, Tuple

import open_clip
import torch

import fastprompt
from fastprompt._extension import extension_loaded, load_error
from fastprompt.benchmarking.timing import rel_err

__all__ = ["selftest", "small_clip", "TOLERANCE"]

TOLERANCE = 1e-10


def small_clip():
    """A real open_clip CLIP at toy width (3 causal text layers, a 32 px ViT), float64, random weights."""
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=48,
        vision_cfg=open_clip.CLIPVisionCfg(layers=1, width=64, head_width=32, patch_size=16, image_size=32),
        text_cfg=open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=4, layers=3),
    )
    return model.double().eval()


def _run(learner, images, upstream):
    params = [p for p in learner.parameters() if p.requires_grad]
    logits = learner(images)
    return logits.detach(), torch.autograd.grad((logits * upstream).sum(), params)


def selftest(verbose: bool = True) -> List[Tuple[str, str, float]]:
    """[(method, backend, max relative error)] for every available fast backend; raises if one disagrees."""
    logging.getLogger().setLevel(logging.ERROR)
    if os.environ.get("FASTPROMPT_REQUIRE_EXT") == "1" and not extension_loaded():
        raise AssertionError(f"FASTPROMPT_REQUIRE_EXT=1 but the compiled extension is not loaded: {load_error()}")
    backends = ["torch", "auto"] + (["compiled"] if extension_loaded() else [])
    names = ["golden retriever", "red_panda", "Lamborghini Gallardo LP 570-4 Superleggera 2012"]
    results = []
    for method in ("coop", "cocoop"):
        learner = fastprompt.create_learner(method, small_clip(), names, n_ctx=3, ctx_init="")
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64)
        upstream = torch.randn(2, len(names), generator=gen, dtype=torch.float64)
        learner.backend = "reference"
        ref_logits, ref_grads = _run(learner, images, upstream)
        for backend in backends:
            learner.backend = backend
            logits, grads = _run(learner, images, upstream)
            err = max([rel_err(logits, ref_logits)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)])
            results.append((method, backend, err))
            if verbose:
                print(f"{method:7s} backend={backend:9s} max rel err vs reference = {err:.1e}")
    bad = [r for r in results if not r[2] <= TOLERANCE]
    if bad:
        raise AssertionError(f"fast path disagrees with the reference (tolerance {TOLERANCE}): {bad}")
    return results
