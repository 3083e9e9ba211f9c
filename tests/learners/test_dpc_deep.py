"""DPC over the deep-prompt backbones (MaPLe, PromptSRC, IVLP): the fast path encodes only the classes its
loss needs through ``text_features(class_idx)``, and still equals the official reference (all classes at 77
tokens, then indexed) on the DHNO loss, its logits and the gradient of every trainable tensor.

Also the hook itself, per learner: ``text_features(class_idx) == text_features()[class_idx]`` on the reference
and the fast backends (values and gradients), the engine sees only the requested classes, the CaPT
``class_shift`` branch, and clear errors on a bad ``class_idx``."""
from __future__ import annotations

import pytest
import torch

import fastprompt
from fastprompt.learners.dpc import DPC
from tests.conftest import rel_err, tiny_clip
from tests.learners.test_dpc import NAMES, assert_dpc_equivalent, images, library, perturb

TOL = 1e-10
# Depth 2 reaches block 1 of the 2-layer tiny vision tower and of the text tower, so deep prompts of both
# towers are exercised (and receive gradient).
KWARGS = {
    "maple": {"prompt_depth": 2},
    "promptsrc": {"prompt_depth_text": 2, "prompt_depth_vision": 2},
    "ivlp": {"prompt_depth_text": 3, "prompt_depth_vision": 2, "n_ctx_text": 3},
}
BACKBONES = sorted(KWARGS)


def make_learner(name, names=NAMES, seed=0):
    model = tiny_clip()
    torch.manual_seed(seed)
    learner = fastprompt.create_learner(name, model, names, **KWARGS[name])
    with torch.no_grad():  # off the init (MaPLe's deep projections start identical), so gradients differ
        for p in learner.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return learner


def spy_engine(monkeypatch, text_encoder):
    """Record the class indices (``c_idx``, argument 3) of every fast engine call of ``text_encoder``."""
    seen = []
    real = text_encoder.fast_features
    monkeypatch.setattr(text_encoder, "fast_features", lambda *a, **k: seen.append(a[3].tolist()) or real(*a, **k))
    return seen


# ---------------------------------------------------------------------- DPC over the deep backbones
@pytest.mark.parametrize("mode", ["official", "paper"])
@pytest.mark.parametrize("name", BACKBONES)
def test_dpc_deep_backbone_fast_equals_reference(name, mode):
    dpc = DPC.from_tuned(make_learner(name), mode=mode, top_k=2, base_weight=0.4, new_weight=0.3, seed=0)
    assert dpc.hooks.takes_class_idx and dpc.hooks.image_uses_prompts
    dpc.set_library(library(len(NAMES)))
    perturb(dpc, 0.02)
    # loss, [B', B'] logits, every trainable gradient (each asserted non-zero), then the classification logits
    assert_dpc_equivalent(dpc, images(3), torch.tensor([0, 4, 4]))


@pytest.mark.parametrize("name", BACKBONES)
def test_dpc_deep_backbone_encodes_only_the_needed_classes(name, monkeypatch):
    dpc = DPC.from_tuned(make_learner(name), top_k=2, seed=0)
    dpc.set_library(library(len(NAMES)))
    dpc.backend = "torch"
    dpc.rng.seed(0)
    batch = dpc.build_batch(images(2), torch.tensor([1, 3]))  # the frozen head encodes all classes here
    needed = sorted(set(batch.labels.tolist()))
    assert len(needed) < len(NAMES)  # else the check below could not tell a subset from all classes
    seen = spy_engine(monkeypatch, dpc.backbone.text)
    dpc.contrastive_loss(batch)
    assert seen == [needed]
    # the reference path is the official one: every class through the 77-token tower, the engine unused
    dpc.backend = "reference"
    dpc.contrastive_loss(batch)
    assert seen == [needed]


# ---------------------------------------------------------------------- the text_features(class_idx) hook
@pytest.mark.parametrize("backend", ["reference", "torch", "auto"])
@pytest.mark.parametrize("name", BACKBONES)
def test_text_features_class_subset(name, backend, monkeypatch):
    learner = make_learner(name)
    learner.backend = backend
    params = [p for p in learner.parameters() if p.requires_grad]
    idx = torch.tensor([5, 0, 5, 2])  # unsorted, with a repeat
    weight = torch.randn(idx.shape[0], learner.text_features().shape[1], dtype=torch.float64)

    full = learner.text_features()
    expected = full[idx]
    exp_grads = torch.autograd.grad((expected * weight).sum(), params, allow_unused=True)
    seen = spy_engine(monkeypatch, learner.text)
    sub = learner.text_features(class_idx=idx)
    grads = torch.autograd.grad((sub * weight).sum(), params, allow_unused=True)

    assert sub.shape == (idx.shape[0], full.shape[1])
    assert rel_err(sub, expected) <= TOL
    n_text = 0
    for g, r in zip(grads, exp_grads):
        if r is None:  # a vision-side tensor: no path from text features
            assert g is None
            continue
        n_text += 1
        assert r.abs().sum() > 0 and rel_err(g, r) <= TOL, rel_err(g, r)
    assert n_text >= 2  # the input context and at least one deep text prompt
    # fast: the engine ran on the requested classes only; reference: never
    assert seen == ([] if backend == "reference" else [idx.tolist()])
    # the default stays all classes, in order
    assert torch.equal(learner.text_features(class_idx=None).detach(), full.detach())


@pytest.mark.parametrize("name", ["maple", "ivlp"])
def test_class_subset_with_class_shift(name):
    """CaPT's per-class input shift with a class subset: the fast diagonal pairs pick shift[class_idx]."""
    learner = make_learner(name)
    C, D = len(NAMES), learner.text.token_embeds.shape[-1]
    shift = (0.1 * torch.randn(C, D, dtype=torch.float64)).requires_grad_()
    idx = torch.tensor([6, 1, 3])
    out = {}
    for backend in ("reference", "torch"):
        learner.backend = backend
        sub = learner.class_text_features(class_shift=shift, class_idx=idx)
        out[backend] = (sub.detach(), torch.autograd.grad(sub.square().sum(), shift)[0])
    learner.backend = "reference"
    full = learner.class_text_features(class_shift=shift).detach()
    assert rel_err(out["reference"][0], full[idx]) <= TOL
    assert rel_err(out["torch"][0], full[idx]) <= TOL
    assert rel_err(out["torch"][1], out["reference"][1]) <= TOL
    assert out["reference"][1][[0, 2, 4, 5]].abs().sum() == 0  # classes outside the subset get no gradient


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_class_idx_errors(backend):
    learner = make_learner("ivlp", names=NAMES[:3])
    learner.backend = backend
    with pytest.raises(TypeError, match="1-D int64 tensor"):
        learner.text_features(class_idx=[0, 1])
    with pytest.raises(TypeError, match="integer class indices"):
        learner.text_features(class_idx=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"non-empty 1-D tensor \[K\], got shape \(1, 2\)"):
        learner.text_features(class_idx=torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="non-empty"):
        learner.text_features(class_idx=torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match=r"0\.\.2, got min 0, max 3"):
        learner.text_features(class_idx=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="got min -1"):
        learner.text_features(class_idx=torch.tensor([-1]))
