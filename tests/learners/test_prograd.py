"""ProGrad: the trainer-visible gradient equals the projection formula computed by hand; fast == reference;
initialisation, teacher templates, base -> new, save/load."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastprompt
from fastprompt.losses import project_gradient
from tests.conftest import images_for, rel_err, tiny_clip
from tests.learners.test_kgcoop import FAST_BACKENDS, NAMES, NEW_NAMES, assert_step_equivalent, perturb, trainable


def test_project_gradient_on_hand_cases():
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    # Conflict (cos < 0): a - (a . b^) b^ with b^ = (-1, 1)/sqrt2 -> (1, 0) - (-1/sqrt2)(-1, 1)/sqrt2 = (0.5, 0.5).
    assert torch.allclose(project_gradient(a, torch.tensor([-1.0, 1.0], dtype=torch.float64)), torch.tensor([0.5, 0.5], dtype=torch.float64))
    # lambda scales the removed component.
    assert torch.allclose(project_gradient(a, torch.tensor([-2.0, 2.0], dtype=torch.float64), 0.5), torch.tensor([0.75, 0.25], dtype=torch.float64))
    # No conflict, orthogonal, or a zero teacher gradient: unchanged.
    for b in ([1.0, 1.0], [0.0, 3.0], [0.0, 0.0]):
        assert torch.equal(project_gradient(a, torch.tensor(b, dtype=torch.float64)), a)
    with pytest.raises(ValueError, match="shape"):
        project_gradient(a, torch.zeros(3))


def _by_hand(learner, model, x, y):
    """CE and KD written out from clip.encode_text / encode_image, their gradients, the projection by hand."""
    p = learner.ctx
    prompts = [learner.template.format(n) for n in learner.classnames]
    w = F.normalize(model.encode_text(torch.as_tensor(learner.tokenizer(prompts))), dim=-1)
    v = F.normalize(model.encode_image(x), dim=-1)
    scale = model.logit_scale.exp()
    t = F.normalize(learner.class_text_features(), dim=-1)
    logits = scale * v @ t.t()
    xe = F.cross_entropy(logits, y)
    teacher = F.softmax(scale * v @ w.t(), dim=-1)  # T = 1
    kd = -(teacher * F.log_softmax(logits, dim=-1)).sum(1).mean()
    (a,) = torch.autograd.grad(xe, [p], retain_graph=True)
    (b,) = torch.autograd.grad(kd, [p])
    cos = float((a * b).sum() / (a.norm() * b.norm()))
    b_unit = b / b.norm()
    expected = a - (a * b_unit).sum() * b_unit if cos < 0 else a
    return xe.detach(), kd.detach(), expected, cos


def _check_step(learner, model, x, y):
    xe, kd, expected, cos = _by_hand(learner, model, x, y)
    learner.ctx.grad = None
    loss, _ = learner.compute_loss(x, y)
    loss.backward()  # what a generic trainer does
    assert float(loss.detach()) == float(xe)  # the surrogate's value is the task loss
    assert rel_err(learner.last_losses["kl"], kd) < 1e-12
    assert rel_err(learner.ctx.grad, expected) < 1e-10, (cos, rel_err(learner.ctx.grad, expected))
    return cos


def test_prograd_gradient_is_the_projection():
    model = tiny_clip()
    learner = fastprompt.create_learner("prograd", model, NAMES, dataset="oxford_pets", backend="reference")
    assert learner.template == "a type of pet, a photo of a {}."
    x = images_for(model, 3, torch.float64)
    v = learner.image_features(x)
    seen = set()
    # Labels the zero-shot teacher favours: CE and KD pull the same way, the gradient is the CE's.
    seen.add(_check_step(learner, model, x, learner.teacher_logits(v).argmax(1)) < 0)
    y = learner.teacher_logits(v).argmin(1)  # labels the teacher finds least likely
    # Fit the student to those labels with plain CE steps: its CE and KD gradients come to conflict.
    learner.backend = "torch"
    opt = torch.optim.SGD([learner.ctx], lr=5.0)
    for _ in range(20):
        loss = F.cross_entropy(learner.logits_from_features(v, learner.class_text_features()), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    learner.backend = "reference"
    seen.add(_check_step(learner, model, x, y) < 0)
    assert seen == {False, True}, "both branches (kept and projected) must be exercised"
    # And the fast path gives the same projected update in this state.
    assert_step_equivalent(learner, x, y, "auto", 1e-10)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_prograd_fast_equals_reference(tiny_model, backend):
    learner = fastprompt.create_learner("prograd", tiny_model, NAMES, n_ctx=6)
    perturb(learner, 0.2)
    x = images_for(tiny_model, 3, torch.float64)
    assert_step_equivalent(learner, x, torch.tensor([3, 1, 0]), backend, 1e-10)


def test_prograd_float32():
    model = tiny_clip(dtype=torch.float32)
    learner = fastprompt.create_learner("prograd", model, NAMES)
    perturb(learner, 0.2)
    assert_step_equivalent(learner, images_for(model, 2, torch.float32), torch.tensor([0, 2]), "auto", 1e-5)


def test_prograd_padded_init_and_eval_loss():
    model = tiny_clip()
    learner = fastprompt.create_learner("prograd", model, NAMES, n_ctx=6)
    assert learner.prompt_prefix == "X X a photo of a" and learner.n_ctx == 6
    assert torch.equal(learner.ctx[:2], torch.zeros(2, 64, dtype=torch.float64))
    ids = torch.as_tensor(learner.tokenizer(["a photo of a"]))
    assert torch.equal(learner.ctx[2:], learner.tower.token_embedding(ids)[0, 1:5])
    with pytest.raises(ValueError, match="n_ctx"):
        fastprompt.create_learner("prograd", model, NAMES, n_ctx=2)
    with torch.no_grad():  # no autograd: the plain task loss, no projection
        loss, logits = learner.compute_loss(images_for(model, 2, torch.float64), torch.tensor([0, 1]))
    assert rel_err(loss, F.cross_entropy(logits, torch.tensor([0, 1]))) == 0


def test_prograd_base_to_new_and_round_trip(tmp_path):
    model = tiny_clip()
    learner = fastprompt.create_learner("prograd", model, NAMES, dataset="food101")
    assert learner.template == "a type of food, a photo of {}."
    perturb(learner)
    x = images_for(model, 2, torch.float64)
    learner.eval()
    with torch.no_grad():
        before = learner(x)
    learner.save_pretrained(str(tmp_path))
    loaded = fastprompt.from_pretrained(str(tmp_path), clip_model=tiny_clip()).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), before)
    loaded.set_classnames(NEW_NAMES)
    assert loaded.teacher_features.shape == (3, 48)
    with torch.no_grad():
        assert loaded(x).shape == (2, 3)
    assert math.isclose(learner.num_trainable_parameters(), 4 * 64) and len(trainable(learner)) == 1
