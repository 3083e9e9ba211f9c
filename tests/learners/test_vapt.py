"""VAPT: fast (fused prompt generator + fast encoder) == reference (official modules + official loop) on logits,
loss and gradients of every trainable tensor; parameter count; prompts exactly zero at initialisation."""
from __future__ import annotations

import os

import pytest
import torch

import fastprompt
from fastprompt.learners.vapt import VAPTClassifier
from tests.conftest import rel_err, tiny_clip
from tests.learners.test_vpt import NAMES, check_equivalent, clip_images, toy_timm, trainable

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def perturb(model, std=0.2):
    """Move every trainable tensor off its initial value: at init the zero token projector makes the conv,
    LayerNorm and MLP gradients exactly zero, which would make a gradient comparison prove nothing."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in trainable(model):
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)
    return model


def test_parameter_count_vitb16():
    import timm

    with torch.device("meta"):  # real ViT-B/16 dims, no memory or init time (only shapes are counted)
        vit = timm.create_model("vit_base_patch16_224", pretrained=False)
    clf = VAPTClassifier.from_timm(vit, 100, num_tokens=10)
    assert sum(p.numel() for p in clf.prompts.parameters()) == 55_608  # 7,680 + 11 x 3,240 + 12,288
    per_layer = {n.split(".", 2)[-1]: p.numel() for n, p in clf.prompts.named_parameters()
                 if n.startswith(("deep_prompt_norm.0.", "deep_prompt_downsample.0."))}
    assert per_layer == {"weight": 768, "bias": 768, "conv.kernel": 4, "linear.weight": 1690, "linear.bias": 10}
    assert clf.num_trainable_parameters() == 55_608 + 768 * 100 + 100


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
def test_prompts_exactly_zero_at_init(fast):
    learner = fastprompt.create_learner("vapt", tiny_clip(), NAMES, num_tokens=3).train()
    gen = learner.prompts
    x = torch.randn(2, 5, learner.encoder.width, dtype=torch.float64)  # CLS + 2 x 2 patches
    source = gen.source(2, fast=fast, backend="reference")
    p1 = source(1, x)
    assert p1.shape == (2, 3, learner.encoder.width) and torch.count_nonzero(p1) == 0
    # so the model at init is VPT-shallow with the static prompts, zeroed prompt rows after block 0
    learner.eval()
    images = clip_images(2)
    P0 = gen.prompt_embeddings[0]
    zero = torch.zeros_like(P0)
    expect = learner.encoder(images, {0: P0, 1: zero}, fast=False)
    assert rel_err(learner.encode_prompted_images(images), expect) <= 1e-12


@pytest.mark.parametrize("backend,insert", [("torch", "after_cls"), ("auto", "append")])
def test_clip_fast_equals_reference(tiny_model, backend, insert):
    learner = perturb(fastprompt.create_learner("vapt", tiny_model, NAMES, num_tokens=3, insert=insert))
    check_equivalent(learner, clip_images(3), backend, TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_clip_train_mode_same_masks(dtype):
    """Training mode (prompt dropout, Dropout2d, MLP dropout): the fused path draws the official masks."""
    learner = perturb(fastprompt.create_learner("vapt", tiny_clip(dtype=dtype), NAMES, num_tokens=2)).train()
    check_equivalent(learner, clip_images(2, dtype), "torch", TOL[dtype])


@pytest.mark.parametrize("vpt_depth", [1, 2])
def test_timm_classifier_fast_equals_reference(vpt_depth):
    clf = perturb(VAPTClassifier.from_timm(toy_timm(), 5, num_tokens=4, vpt_depth=vpt_depth)).train()
    assert clf.prompts.config.vpt_depth == vpt_depth and len(clf.prompts.deep_prompt_norm) == 3 - vpt_depth
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    check_equivalent(clf, images, "torch", TOL[torch.float64], labels=torch.tensor([4, 0]))


@pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="Triton needs CUDA or TRITON_INTERPRET=1")
def test_timm_classifier_triton_backend():
    """The learner on the fused Triton generator (interpreter on CPU: 4 x 4 patch grid, 2 adaptive layers)."""
    vit = toy_timm(dtype=torch.float32)
    clf = perturb(VAPTClassifier.from_timm(vit, 3, num_tokens=3)).train()
    check_equivalent(clf, torch.randn(2, 3, 32, 32), "triton", TOL[torch.float32])


def test_timm_roundtrip(tmp_path):
    clf = perturb(VAPTClassifier.from_timm(toy_timm(depth=2), 3, num_tokens=2)).eval()
    clf.save_pretrained(str(tmp_path))
    back = VAPTClassifier.from_pretrained(str(tmp_path), toy_timm(depth=2)).eval()
    assert isinstance(back, VAPTClassifier) and back.method == "vapt"
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert torch.equal(back(x), clf(x))
    from fastprompt.learners.vpt import VPTClassifier

    with pytest.raises(ValueError, match="'vapt' classifier"):
        VPTClassifier.from_pretrained(str(tmp_path), toy_timm(depth=2))


def test_errors(tiny_model):
    with pytest.raises(ValueError, match="vpt_depth"):
        fastprompt.create_learner("vapt", tiny_model, NAMES, vpt_depth=0)
    with pytest.raises(ValueError, match="kernel 3"):
        fastprompt.create_learner("vapt", tiny_model, NAMES, kernel=3)  # 2 x 2 patch grid
    with pytest.raises(ValueError, match="dropout_mlp"):
        fastprompt.create_learner("vapt", tiny_model, NAMES, dropout_mlp=1.0)
