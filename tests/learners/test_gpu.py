"""Learner-level equivalence on CUDA (skipped without a GPU): every backend, bf16 / fp16 / fp32."""
from __future__ import annotations

import pytest
import torch

import fastprompt
from tests.conftest import rel_err
from tests.learners.test_equivalence import logits_and_grads

pytestmark = pytest.mark.gpu

TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
NAMES = fastprompt.load_classnames("stanford_cars")[:40]


@pytest.fixture(scope="module")
def vitb16():
    model, _, tokenizer = fastprompt.load_clip("ViT-B-16", pretrained=None)
    return model, tokenizer


@pytest.mark.parametrize("backend", ["torch", "triton", "compiled", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method,kwargs", [("coop", {}), ("coop", {"class_token_position": "middle"}),
                                           ("coop", {"csc": True, "n_ctx": 4}), ("cocoop", {})])
def test_learners_on_cuda(vitb16, backend, dtype, method, kwargs):
    model, tokenizer = vitb16
    model = model.to("cuda", dtype)
    learner = fastprompt.create_learner(method, model, NAMES, tokenizer=tokenizer, **kwargs)
    images = torch.randn(4, 3, 224, 224, device="cuda", dtype=dtype)
    # The fp32 reference is the yardstick for low-precision fast paths (the low-precision reference
    # has its own rounding error of the same order).
    learner32 = learner.float()
    learner32.backend = "reference"
    ref_logits, ref_grads, upstream = logits_and_grads(learner32, images.float())
    learner = learner.to(dtype)
    learner.backend = backend
    logits, grads, _ = logits_and_grads(learner, images, upstream.to(dtype))
    assert rel_err(logits, ref_logits) <= TOL[dtype]
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= TOL[dtype] * 5  # gradients accumulate over all classes in low precision
