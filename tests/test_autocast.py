"""The fast engine under autocast (bf16 on the CPU here; bf16/fp16 on CUDA in the GPU tests).

Under autocast the reference itself is rounded, so "exact" means: the fast path's outputs and gradients are as
close to the float32 result as the reference's own autocast outputs are (within a small factor), and close to
the autocast reference. The kernels take one dtype, so the dispatchers cast the way autocast casts the
reference's torch ops (tests/ops check the kernels themselves at each dtype).
"""
from __future__ import annotations

import pytest
import torch

import fastprompt
from tests.conftest import rel_err, tiny_clip

NAMES = ["cat", "dog", "big red fish", "a rather long class name"]


def _run(learner, images, backend, autocast: bool):
    learner.backend = backend
    learner.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = learner(images)
        loss = torch.nn.functional.cross_entropy(logits.float(), torch.arange(images.shape[0]) % len(NAMES))
    loss.backward()
    grads = [p.grad.detach().float().clone() for p in learner.parameters() if p.requires_grad]
    return logits.detach().float(), grads


@pytest.mark.parametrize("method", ["coop", "cocoop"])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_fast_engine_under_bf16_autocast(method, backend):
    model = tiny_clip(dtype=torch.float32)
    learner = fastprompt.create_learner(method, model, NAMES)
    images = torch.randn(3, 3, 32, 32)
    exact_out, exact_grads = _run(learner, images, "reference", autocast=False)
    ref_out, ref_grads = _run(learner, images, "reference", autocast=True)
    fast_out, fast_grads = _run(learner, images, backend, autocast=True)
    assert fast_out.shape == ref_out.shape and len(fast_grads) == len(ref_grads) == len(exact_grads) > 0
    # Per tensor (output, each gradient): the fast path's distance to the float32 result is at most a small
    # multiple of the bf16 reference's own distance, plus one bf16 ulp for a tensor the reference gets almost
    # exactly. No fixed figure: the bound scales with what bf16 costs the reference on this machine's kernels.
    floor = torch.finfo(torch.bfloat16).eps
    pairs = [(fast_out, ref_out, exact_out)] + list(zip(fast_grads, ref_grads, exact_grads))
    assert max(rel_err(r, e) for _, r, e in pairs) > 0  # autocast really changed the reference's arithmetic
    for i, (f, r, e) in enumerate(pairs):
        ref_err, fast_err = rel_err(r, e), rel_err(f, e)
        assert fast_err <= 4 * ref_err + floor, (i, fast_err, ref_err)
