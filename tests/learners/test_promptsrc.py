"""PromptSRC: fast path == reference on the full objective, the objective against a plain transcription of
the official loss, GPA (trainable tensors only, the Gaussian-weighted sum), templates, parameter count,
base -> new, save / load."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastprompt
from fastprompt.learners._deep_prompts import GaussianPromptAggregation, gaussian_epoch_weights
from fastprompt.templates import IMAGENET_TEMPLATES, imagenet_templates
from tests.conftest import rel_err
from tests.learners.test_maple import (
    FAST_BACKENDS, NAMES, TOL, assert_roundtrip, assert_step_equivalent, images_for, perturb, tiny_deep_clip,
)

SMALL = dict(prompt_depth_text=3, prompt_depth_vision=3)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_promptsrc_fast_equals_reference(backend):
    model = tiny_deep_clip()
    learner = fastprompt.create_learner("promptsrc", model, NAMES, **SMALL)
    perturb(learner)
    assert_step_equivalent(learner, images_for(model, 3, torch.float64), torch.tensor([1, 1, 3]), backend, TOL[torch.float64])


def test_promptsrc_float32():
    model = tiny_deep_clip(torch.float32)
    learner = fastprompt.create_learner("promptsrc", model, NAMES, **SMALL)
    perturb(learner)
    assert_step_equivalent(learner, images_for(model, 2, torch.float32), torch.tensor([0, 3]), "auto", TOL[torch.float32])


def test_promptsrc_objective_matches_official_formula():
    """compute_loss == CE + 25 L1(text) + 10 L1(image) + KL(p_zs || p) / (B C), written out plainly from the
    official forward_backward, with the frozen text features averaged over the 60 templates by encode_text."""
    model = tiny_deep_clip()
    names = NAMES[:3]
    learner = fastprompt.create_learner("promptsrc", model, names, **SMALL)
    perturb(learner)
    learner.train()
    images, labels = images_for(model, 2, torch.float64), torch.tensor([2, 0])
    loss, logits = learner.compute_loss(images, labels)
    tok = learner.tokenizer
    with torch.no_grad():
        per_template = [model.encode_text(torch.as_tensor(tok([t.replace("{}", n.replace("_", " ")) for n in names]))) for t in IMAGENET_TEMPLATES]
        fixed = torch.stack(per_template, dim=1).mean(dim=1)
        fixed = fixed / fixed.norm(dim=-1, keepdim=True)
        zs = model.encode_image(images)
        zs = zs / zs.norm(dim=-1, keepdim=True)
    scale = model.logit_scale.exp()
    t = learner.text_features()
    t = t / t.norm(dim=-1, keepdim=True)
    v = learner.image_features(images)
    v = v / v.norm(dim=-1, keepdim=True)
    lg = scale * v @ t.t()
    zs_logits = scale * zs @ fixed.t()
    p_zs = zs_logits.softmax(dim=1)
    kl = (p_zs * (p_zs.log() - lg.log_softmax(dim=1))).sum() / lg.numel()
    expected = F.cross_entropy(lg, labels) + 25 * (t - fixed).abs().mean() + 10 * (v - zs).abs().mean() + kl
    assert rel_err(logits, lg) <= 1e-12
    assert rel_err(loss, expected) <= 1e-12
    assert kl > 0 and (t - fixed).abs().mean() > 0


def test_imagenet_templates():
    assert len(IMAGENET_TEMPLATES) == 60 == len(set(IMAGENET_TEMPLATES))
    assert IMAGENET_TEMPLATES[0] == "a photo of a {}." and IMAGENET_TEMPLATES[1] == "a bad photo of a {}."
    assert IMAGENET_TEMPLATES[-1] == "itap of the {}." and IMAGENET_TEMPLATES[40] == "the origami {}."
    assert imagenet_templates() == IMAGENET_TEMPLATES and all("{}" in t for t in IMAGENET_TEMPLATES)


def test_gpa_weights_formula():
    w = gaussian_epoch_weights(15, 1, 20)
    dens = [math.exp(-0.5 * (e - 15) ** 2) / math.sqrt(2 * math.pi) for e in range(1, 21)]
    assert len(w) == 20 and abs(sum(w) - 1) < 1e-15
    assert all(abs(a - d / sum(dens)) < 1e-15 for a, d in zip(w, dens))
    assert max(range(20), key=lambda i: w[i]) == 14  # epoch 15 (1-based) weighs most
    with pytest.raises(ValueError):
        gaussian_epoch_weights(15, 0, 20)
    with pytest.raises(ValueError):
        gaussian_epoch_weights(15, 1, 0)


def test_gpa_on_epoch_end_hand_built_sequence():
    """Trainable tensors set to known values each epoch; after the last epoch they equal sum_e w_e theta_e;
    frozen tensors are untouched; evaluation uses the aggregate (no stale text cache)."""
    model = tiny_deep_clip()
    learner = fastprompt.create_learner("promptsrc", model, NAMES, gpa_mean=2.0, gpa_std=1.5, **SMALL)
    frozen_before = {n: p.clone() for n, p in learner.named_parameters() if not p.requires_grad}
    trainable = {n: p for n, p in learner.named_parameters() if p.requires_grad}
    E = 4
    w = gaussian_epoch_weights(2.0, 1.5, E)
    history = []
    learner.eval()
    with torch.no_grad():
        learner.encode_text()  # fill the eval cache, so a stale cache would show
    for epoch in range(E):
        values = {n: torch.randn_like(p) for n, p in trainable.items()}
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(values[n])
        history.append(values)
        learner.on_epoch_end(epoch, E)
        if epoch < E - 1:  # no change until the last epoch
            assert all(torch.equal(trainable[n], values[n]) for n in trainable)
    for n, p in trainable.items():
        expected = sum(w[e] * history[e][n] for e in range(E))
        assert rel_err(p, expected) <= 1e-14, n
    for n, p in learner.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), n
    with torch.no_grad():
        cached = learner.encode_text()
        learner.backend = "reference"
        fresh = F.normalize(learner.text_features(), dim=-1)
    assert rel_err(cached, fresh) <= 1e-10
    with pytest.raises(ValueError, match="epoch"):
        learner.on_epoch_end(5, E)


def test_gpa_restarts_and_rejects_changing_length():
    lin = torch.nn.Linear(2, 2, bias=False).double()
    gpa = GaussianPromptAggregation(1.0, 1.0)
    gpa.update(lin, 0, 3)
    with pytest.raises(ValueError, match="max_epoch changed"):
        gpa.update(lin, 1, 5)
    gpa.update(lin, 0, 2)  # a new run restarts at epoch 0
    w = lin.weight.detach().clone()
    assert gpa.update(lin, 1, 2) and torch.allclose(lin.weight, w)  # constant tensor: the aggregate is itself


def test_promptsrc_parameter_count_vitb16(vitb16_f64):
    model, tokenizer = vitb16_f64
    learner = fastprompt.create_learner("promptsrc", model, ["dog", "cat"], tokenizer=tokenizer)
    assert learner.num_trainable_parameters() == 46_080  # 9 x 4 x 512 + 9 x 4 x 768
    cfg = learner.config
    assert (cfg.text_loss_weight, cfg.image_loss_weight, cfg.gpa_mean, cfg.gpa_std) == (25.0, 10.0, 15.0, 1.0)


def test_promptsrc_plugin_hooks_and_errors():
    model = tiny_deep_clip()
    learner = fastprompt.create_learner("promptsrc", model, NAMES, **SMALL)
    images, labels = images_for(model, 2, torch.float64), torch.tensor([0, 1])
    learner.eval()
    v = learner.image_features(images)
    with pytest.raises(ValueError, match="frozen image features"):
        learner.loss_from_features(v, learner.text_features(), labels)
    learner.train()
    v = learner.image_features(images)  # training mode: the frozen features of the batch are kept
    loss_hook, _ = learner.loss_from_features(v, learner.text_features(), labels)
    loss, _ = learner.compute_loss(images, labels)
    assert rel_err(loss_hook, loss) <= 1e-14
    with pytest.raises(ValueError, match="fixed text features"):
        learner.set_fixed_text_features(torch.zeros(2, 48))


def test_promptsrc_base_to_new_roundtrip(tmp_path):
    model = tiny_deep_clip()
    learner = fastprompt.create_learner("promptsrc", model, NAMES[:2], **SMALL)
    before = learner.fixed_text_features().clone()
    assert_roundtrip(learner, model, ["cat", "red panda", "dog"], tmp_path, images_for(model, 2, torch.float64))
    assert learner.fixed_text_features().shape == (3, 48) and before.shape == (2, 48)
