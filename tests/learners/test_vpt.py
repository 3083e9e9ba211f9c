"""VPT: fast == reference (logits, loss, gradients of every trainable tensor) on open_clip CLIP and timm ViTs,
official init, prompt dropout, the classifier's training interface and save / load."""
from __future__ import annotations

import math

import pytest
import torch

import fastprompt
from fastprompt.learners.vpt import VPTClassifier, vpt_init_bound
from tests.conftest import randomize_layernorms, rel_err, tiny_clip, trainable

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
NAMES = ["golden retriever", "cat", "Lamborghini Gallardo LP 570-4 Superleggera 2012"]


def toy_timm(dtype=torch.float64, depth=3, **kw):
    import timm

    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=depth, **kw)
    return randomize_layernorms(m).to(dtype).eval()


def check_equivalent(model, images, backend="torch", tol=1e-10, labels=None, seed=5):
    """Reference vs ``backend``: logits, (loss) and the gradient of every trainable tensor, same RNG seed."""
    params = trainable(model)
    model.backend = "reference"
    torch.manual_seed(seed)
    ref = model(images)
    up = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * up).sum(), params)
    model.backend = backend
    torch.manual_seed(seed)
    out = model(images)
    g_out = torch.autograd.grad((out * up).sum(), params)
    assert rel_err(out, ref) <= tol, rel_err(out, ref)
    assert len(g_out) == len(g_ref) > 0
    for a, b in zip(g_out, g_ref):
        assert b.abs().sum() > 0, "reference gradient is zero: the test would prove nothing"
        assert rel_err(a, b) <= tol, rel_err(a, b)
    if labels is not None:
        model.backend = "reference"
        torch.manual_seed(seed)
        l_ref, _ = model.compute_loss(images, labels)
        model.backend = backend
        torch.manual_seed(seed)
        l_out, _ = model.compute_loss(images, labels)
        assert abs(float(l_out.detach() - l_ref.detach())) <= tol * abs(float(l_ref.detach()))


def clip_images(n, dtype=torch.float64):
    return torch.randn(n, 3, 32, 32, dtype=dtype)


@pytest.mark.parametrize("backend,insert,deep", [
    ("torch", "after_cls", False), ("torch", "after_cls", True), ("auto", "append", True), ("torch", "append", False)])
def test_clip_fast_equals_reference(tiny_model, backend, insert, deep):
    learner = fastprompt.create_learner("vpt", tiny_model, NAMES, num_tokens=3, deep=deep, insert=insert)
    check_equivalent(learner, clip_images(3), backend, TOL[torch.float64])


def test_clip_train_mode_prompt_dropout_float32():
    model = tiny_clip(dtype=torch.float32)
    learner = fastprompt.create_learner("vpt", model, NAMES, num_tokens=4, deep=True, dropout=0.1).train()
    assert not learner.clip.training
    check_equivalent(learner, clip_images(2, torch.float32), "torch", TOL[torch.float32])
    # dropout is live: two draws differ
    a, b = learner(clip_images(1, torch.float32).repeat(2, 1, 1, 1)).detach()
    assert not torch.equal(a, b)


def test_clip_logits_are_scaled_cosines_with_frozen_template_text(tiny_model):
    learner = fastprompt.create_learner("vpt", tiny_model, NAMES, num_tokens=2, dataset="OxfordPets")
    assert learner.template == "a photo of a {}, a type of pet."
    images = clip_images(2)
    text = learner.frozen_text_features([learner.template.format(n) for n in NAMES])
    feats = learner.encoder(images, {0: learner.prompts.prompt_embeddings[0]}, fast=False)
    expect = learner.logit_scale * torch.nn.functional.normalize(feats, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).t()
    assert rel_err(learner(images), expect) <= 1e-12


def test_official_init_and_counts():
    import timm

    vit = timm.create_model("vit_base_patch16_224", pretrained=False)
    clf = VPTClassifier.from_timm(vit, 100, num_tokens=10, deep=True)
    bound = vpt_init_bound(16, 768)
    assert math.isclose(bound, 0.0625)
    n_prompt = sum(p.numel() for p in clf.prompts.parameters())
    assert n_prompt == 12 * 10 * 768 == 92160  # VPT-deep, N = 10
    for p in clf.prompts.parameters():
        assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound
    assert clf.num_trainable_parameters() == 92160 + 768 * 100 + 100
    assert torch.allclose(clf.head.bias, torch.full((100,), -math.log(99.0)))
    assert {n for n, p in clf.named_parameters() if p.requires_grad} == {
        "prompts.prompt_embeddings", "prompts.deep_prompt_embeddings", "head.weight", "head.bias"}


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_timm_classifier_fast_equals_reference(deep):
    vit = toy_timm()
    clf = VPTClassifier.from_timm(vit, 7, num_tokens=3, deep=deep, dropout=0.1).train()
    assert not clf.backbone.training and clf.prompts.training
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    check_equivalent(clf, images, "torch", TOL[torch.float64], labels=torch.tensor([0, 3, 6]))


def test_timm_classifier_interface_and_roundtrip(tmp_path):
    vit = toy_timm(dtype=torch.float32, depth=2)
    clf = VPTClassifier.from_timm(vit, 4, num_tokens=2, deep=True, backend="reference")
    assert clf.backend == "reference" and clf.uses_reference
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    loss, logits = clf.compute_loss(images, labels)
    assert logits.shape == (2, 4) and torch.isclose(loss, torch.nn.functional.cross_entropy(logits, labels))
    groups = clf.param_groups(0.1)
    assert sum(p.numel() for g in groups for p in g["params"]) == clf.num_trainable_parameters()
    opt = torch.optim.SGD(clf.param_groups(0.5), lr=0.5)
    loss.backward()
    opt.step()
    clf.on_epoch_end(0, 1)
    clf.attach_train_data(None)
    clf.save_pretrained(str(tmp_path))
    back = VPTClassifier.from_pretrained(str(tmp_path), toy_timm(dtype=torch.float32, depth=2))
    for k, v in clf.trainable_state_dict().items():
        assert torch.equal(back.trainable_state_dict()[k], v)
    clf.eval(), back.eval()
    assert torch.equal(back(images), clf(images))
    with pytest.raises(ValueError, match="unknown backend"):
        clf.backend = "fastest"


def test_timm_head_bias_has_no_weight_decay():
    """VPT/VAPT ``make_optimizer`` (SGD with WEIGHT_DECAY > 0): the head's bias is not decayed, every other
    trainable tensor is; checked on an SGD step with zero gradients, where only decay moves a tensor."""
    clf = VPTClassifier.from_timm(toy_timm(dtype=torch.float32, depth=2), 4, num_tokens=2, deep=True)
    groups = clf.param_groups(0.5)
    assert [g.get("weight_decay") for g in groups] == [None, 0.0] and groups[1]["params"] == [clf.head.bias]
    before = {n: p.detach().clone() for n, p in clf.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(groups, lr=0.5, weight_decay=0.1)
    for p in clf.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()
    after = dict(clf.named_parameters())
    for name, old in before.items():
        expected = old if name == "head.bias" else old * (1 - 0.5 * 0.1)
        assert torch.allclose(after[name].detach(), expected, rtol=1e-6, atol=0), name


def test_clip_save_and_load(tmp_path, tiny_model):
    learner = fastprompt.create_learner("vpt", tiny_model, NAMES, num_tokens=2, deep=True)
    learner.save_pretrained(str(tmp_path))
    back = fastprompt.from_pretrained(str(tmp_path), clip_model=tiny_model)
    assert back.method == "vpt"
    images = clip_images(2)
    learner.eval(), back.eval()
    assert torch.equal(back(images), learner(images))


def test_errors(tiny_model):
    with pytest.raises(ValueError, match="num_tokens"):
        fastprompt.create_learner("vpt", tiny_model, NAMES, num_tokens=0)
    with pytest.raises(ValueError, match="insert"):
        fastprompt.create_learner("vpt", tiny_model, NAMES, insert="middle")
    with pytest.raises(TypeError, match="no option"):
        fastprompt.create_learner("vpt", tiny_model, NAMES, n_ctx=4)
    with pytest.raises(TypeError, match="timm"):
        VPTClassifier.from_timm(tiny_model.visual, 3)
    with pytest.raises(ValueError, match="num_classes"):
        VPTClassifier.from_timm(toy_timm(depth=1), 0)
