"""DAPT: fast path == reference (loss, logits, every gradient; the image side alone, also with VIS_DROPOUT),
the objective and the image encoder against the official formula on both backends, prototypes (from features
and from a DatasetSplits of image files), class shift hook, base -> new, save / load."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastprompt
from tests.conftest import rel_err
from tests.learners.test_maple import (
    FAST_BACKENDS, NAMES, TOL, assert_roundtrip, assert_step_equivalent, images_for, perturb, tiny_deep_clip,
)

SMALL = dict(vis_num_tokens=3, txt_num_tokens=5)


def with_prototypes(learner, dtype=torch.float64):
    learner.set_prototypes(F.normalize(torch.randn(len(learner.classnames), 48, dtype=dtype), dim=-1) * 0.9)
    return learner


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("tokens", [dict(vis_num_tokens=3, txt_num_tokens=5), {}])
def test_dapt_fast_equals_reference(backend, tokens):
    model = tiny_deep_clip()
    learner = with_prototypes(fastprompt.create_learner("dapt", model, NAMES, **tokens))
    assert_step_equivalent(learner, images_for(model, 3, torch.float64), torch.tensor([0, 3, 3]), backend, TOL[torch.float64])


def test_dapt_float32():
    model = tiny_deep_clip(torch.float32)
    learner = with_prototypes(fastprompt.create_learner("dapt", model, NAMES, **SMALL), torch.float32)
    assert_step_equivalent(learner, images_for(model, 2, torch.float32), torch.tensor([1, 2]), "auto", TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_dapt_image_side_fast_equals_reference(backend, dtype, monkeypatch):
    """The image side alone: prompted features and the vis_ctx gradient, fast (the prompted vision encoder,
    prompts after ln_pre) against the reference (the official ImageEncoder); the fast backend really runs the
    encoder's fast path and the reference backend never does."""
    from fastprompt.encoders.prompted_vision import PromptedVisionEncoder

    calls = []
    orig = PromptedVisionEncoder._forward_fast
    monkeypatch.setattr(PromptedVisionEncoder, "_forward_fast", lambda self, *a: calls.append(1) or orig(self, *a))
    model = tiny_deep_clip(dtype)
    learner = fastprompt.create_learner("dapt", model, NAMES, **SMALL)
    perturb(learner)
    images = images_for(model, 3, dtype)
    out = {}
    for b in ("reference", backend):
        learner.backend = b
        v = learner.image_features(images)
        up = torch.linspace(-1, 1, v.numel(), dtype=dtype).view_as(v)
        out[b] = (v, torch.autograd.grad((v * up).sum(), learner.vis_ctx)[0], len(calls))
    (v_ref, g_ref, n_ref), (v_fast, g_fast, n_fast) = out["reference"], out[backend]
    assert n_ref == 0 and n_fast == 1
    assert g_ref.abs().sum() > 0
    assert rel_err(v_fast, v_ref) <= TOL[dtype] and rel_err(g_fast, g_ref) <= TOL[dtype]


def test_dapt_vis_dropout_fast_equals_reference():
    """With VIS_DROPOUT > 0 in training both backends draw the same per-image masks from the same seed."""
    model = tiny_deep_clip()
    learner = fastprompt.create_learner("dapt", model, NAMES, vis_dropout=0.5, **SMALL)
    learner.train()
    images = images_for(model, 3, torch.float64)
    out = {}
    for b in ("reference", "auto"):
        learner.backend = b
        torch.manual_seed(7)
        v = learner.image_features(images)
        out[b] = (v, torch.autograd.grad(v.square().sum(), learner.vis_ctx)[0])
    assert rel_err(out["auto"][0], out["reference"][0]) <= 1e-10
    assert rel_err(out["auto"][1], out["reference"][1]) <= 1e-10
    learner.eval()
    assert rel_err(learner.image_features(images), out["auto"][0]) > 1e-3  # the dropout was active


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_dapt_objective_and_vision_match_official(backend):
    model = tiny_deep_clip()
    learner = with_prototypes(fastprompt.create_learner("dapt", model, NAMES, **SMALL))
    learner.train()
    learner.backend = backend
    images, labels = images_for(model, 2, torch.float64), torch.tensor([3, 1])
    loss, logits = learner.compute_loss(images, labels)
    # official ImageEncoder: ln_pre first, then [CLS, prompts, patches] through the tower, CLS -> ln_post -> proj
    v_ = model.visual
    x = v_.conv1(images).flatten(2).permute(0, 2, 1)
    x = torch.cat([v_.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + v_.positional_embedding
    x = v_.ln_pre(x)
    x = torch.cat([x[:, :1], learner.vis_ctx.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
    for blk in v_.transformer.resblocks:
        x = blk(x)
    v = v_.ln_post(x[:, 0]) @ v_.proj
    assert rel_err(learner.image_features(images), v) <= (1e-12 if backend == "reference" else 1e-10)
    v = v / v.norm(dim=-1, keepdim=True)
    t = learner.text_features()
    t = t / t.norm(dim=-1, keepdim=True)
    lg = model.logit_scale.exp() * v @ t.t()
    d2 = ((t.unsqueeze(0) - t.unsqueeze(1)) ** 2).sum(-1)
    iu = torch.triu_indices(len(NAMES), len(NAMES), 1)
    rbf = torch.exp(-2.0 * d2[iu[0], iu[1]]).mean()
    mse = ((v - learner.prototypes[labels]) ** 2).mean()
    expected = F.cross_entropy(lg, labels) + 0.1 * mse + 0.1 * rbf
    tol = 1e-12 if backend == "reference" else 1e-10
    assert rel_err(logits, lg) <= tol and rel_err(loss, expected) <= tol


def test_dapt_prototypes_from_features():
    model = tiny_deep_clip()
    learner = fastprompt.create_learner("dapt", model, ["a", "b", "c"], **SMALL)
    feats = torch.randn(7, 48, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 0, 2, 2, 1])
    proto = learner.prototypes_from_features(feats, labels)
    fn = F.normalize(feats, dim=-1)
    for c in range(3):
        assert torch.allclose(proto[c], fn[labels == c].mean(0), atol=1e-15)
    with pytest.raises(ValueError, match="no training image"):
        learner.prototypes_from_features(feats[:2], labels[:2])
    with pytest.raises(ValueError, match="prototypes must be"):
        learner.set_prototypes(torch.zeros(2, 48))
    learner.train()
    with pytest.raises(ValueError, match="prototypes"):
        learner.compute_loss(images_for(model, 1, torch.float64), torch.tensor([0]))


def test_dapt_attach_train_data(tmp_path):
    """Prototypes from a DatasetSplits of image files == the mean of normalised frozen features of the same
    transformed images."""
    from PIL import Image

    from fastprompt.datasets.base import DatasetSplits, Datum

    model = tiny_deep_clip()
    learner = fastprompt.create_learner("dapt", model, ["a", "b"], **SMALL)
    rng = torch.Generator().manual_seed(0)
    items = []
    for i, label in enumerate([0, 1, 1, 0, 1]):
        arr = (torch.rand(40, 48, 3, generator=rng) * 255).to(torch.uint8).numpy()
        path = tmp_path / f"img{i}.png"
        Image.fromarray(arr).save(path)
        items.append(Datum(str(path), label))
    ds = DatasetSplits("toy", ["a", "b"], train_x=items)
    import open_clip

    tf = open_clip.image_transform(32, is_train=False)
    learner.attach_train_data(ds, transform=tf, batch_size=2)
    imgs = torch.stack([tf(Image.open(d.impath).convert("RGB")) for d in items]).double()
    with torch.no_grad():
        f = F.normalize(model.encode_image(imgs), dim=-1)
    labels = torch.tensor([d.label for d in items])
    expected = torch.stack([f[labels == c].mean(0) for c in range(2)])
    assert rel_err(learner.prototypes, expected) <= 1e-12
    learner.attach_train_data(ds)  # the default transform works too
    assert learner.prototypes.shape == (2, 48)
    with pytest.raises(ValueError, match="training images"):
        learner.attach_train_data(DatasetSplits("toy", ["a", "b"]))


def test_dapt_class_shift_plugin():
    model = tiny_deep_clip()
    learner = fastprompt.create_learner("dapt", model, NAMES, **SMALL)
    shift = torch.randn(len(NAMES), 64, dtype=torch.float64, requires_grad=True)
    out = {}
    for backend in ("reference", "auto"):
        learner.backend = backend
        t = learner.class_text_features(class_shift=shift)
        out[backend] = (t, torch.autograd.grad(t.sum(), (shift, learner.txt_ctx)))
    assert rel_err(out["auto"][0], out["reference"][0]) <= 1e-10
    for a, b in zip(out["auto"][1], out["reference"][1]):
        assert rel_err(a, b) <= 1e-10


def test_dapt_defaults_and_roundtrip(tmp_path):
    model = tiny_deep_clip()
    learner = fastprompt.create_learner("dapt", model, NAMES[:3])
    assert learner.txt_ctx.shape == (16, 64) and learner.vis_ctx.shape == (1, 16, 64)
    bound = (6.0 / (3 * 16 * 16 + 64)) ** 0.5
    assert learner.vis_ctx.abs().max() <= bound
    assert learner.num_trainable_parameters() == 16 * 64 + 16 * 64
    with_prototypes(learner)
    assert_roundtrip(learner, model, ["cat", "dog"], tmp_path, images_for(model, 2, torch.float64))
    assert learner.prototypes is None  # class count changed: base prototypes no longer apply
