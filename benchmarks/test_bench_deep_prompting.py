"""Full training steps of the deep multimodal prompt learners (MaPLe, IVLP, PromptSRC): forward + backward
through both prompted encoders, official reference vs fast path, timed in the same run.

ViT-B/16 architecture with random weights (no download), float32; on the CPU batch 1 and 25 Caltech101 classes, one timed round each so that the file stays under
~3 minutes on a 2-core machine (the reference encodes every class at 77 tokens); on a GPU batch 4, 1000 classes. PromptSRC's frozen template
features (60 templates x C frozen text passes, computed once per class list, not per step) are replaced by
random ones so the timing is of the step only.
"""
from __future__ import annotations

import pytest
import torch

import fastprompt
from benchmarks.conftest import first_call_ms, record
from fastprompt.benchmarking.timing import rel_err as _rel, sync as _sync

CASES = [("maple", {}), ("ivlp", {}), ("promptsrc", {})]


@pytest.fixture(scope="module")
def vitb16(device):
    torch.manual_seed(0)
    model, _, tokenizer = fastprompt.load_clip("ViT-B-16", pretrained=None, device=device)
    return model.float(), tokenizer


def _step(learner, images, labels):
    params = [p for p in learner.parameters() if p.requires_grad]

    def run():
        loss, logits = learner.compute_loss(images, labels)
        grads = torch.autograd.grad(loss, params)
        return torch.cat([loss.detach().view(1), logits.detach().flatten()]), grads

    return run


@pytest.mark.parametrize("method,kwargs", CASES, ids=[c[0] for c in CASES])
def test_deep_prompting_step(benchmark, vitb16, device, method, kwargs):
    model, tokenizer = vitb16
    cpu = device.type == "cpu"
    n_cls, batch = (25, 1) if cpu else (1000, 4)
    names = fastprompt.load_classnames("caltech101" if n_cls <= 100 else "imagenet")[:n_cls]
    learner = fastprompt.create_learner(method, model, names, tokenizer=tokenizer, **kwargs).to(device)
    if method == "promptsrc":
        learner.set_fixed_text_features(torch.randn(n_cls, model.visual.output_dim, device=device))
    learner.train()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, 224, 224, generator=g).to(device)
    labels = torch.randint(0, n_cls, (batch,), generator=g).to(device)
    step = _step(learner, images, labels)

    learner.backend = "reference"
    (ref_out, ref_grads), ref_ms = first_call_ms(step, device)  # CPU: the first call's time; GPU: median of 5

    learner.backend = "auto"
    fast_out, fast_grads = step()
    err = max([_rel(fast_out, ref_out)] + [_rel(f, r) for f, r in zip(fast_grads, ref_grads)])
    assert err < 1e-4, f"fast path disagrees with the reference: {err:.2e}"
    benchmark.pedantic(lambda: (step(), _sync(device)), rounds=1 if cpu else 20, warmup_rounds=0 if cpu else 2)
    fast_ms = benchmark.stats.stats.median * 1e3

    info = {
        "method": method, "classes": n_cls, "batch": batch, "device": str(device), "dtype": "float32",
        "reference_ms": ref_ms, "fast_ms": fast_ms, "speedup": ref_ms / fast_ms, "max_rel_err": err,
        "backend": learner.backend, "trainable": learner.num_trainable_parameters(),
    }
    benchmark.extra_info.update(info)
    record(info)
