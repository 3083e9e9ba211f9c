"""KgCoOp: fast == reference (logits, loss, gradients), the knowledge-guidance loss against its formula,
template table, base -> new classes, save/load, errors. Also holds the helpers the other family tests share."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastprompt
from fastprompt._extension import extension_loaded
from fastprompt.templates import KGCOOP_TEMPLATES
from tests.conftest import images_for, rel_err, tiny_clip, trainable

FAST_BACKENDS = ["torch", "auto"] + (["compiled"] if extension_loaded() else [])
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
NAMES = ["golden retriever", "Lamborghini Gallardo LP 570-4 Superleggera 2012", "a_b_c", "cat"]
NEW_NAMES = ["red panda", "Mexican hairless dog (xoloitzcuintli)", "dog"]


def perturb(learner, std=0.05):
    """Move every trainable tensor off its initial value (ones/zeros of FiLM, word-embedding contexts...)."""
    with torch.no_grad():
        for p in trainable(learner):
            p.add_(std * torch.randn_like(p))


def step_outputs(learner, images, labels):
    """(eval logits, training loss, training logits, grads of the loss w.r.t. every trainable tensor)."""
    learner.eval()
    with torch.no_grad():
        eval_logits = learner(images)
    learner.train()
    torch.manual_seed(0)  # the same dropout masks (CaPT's MLP) under both backends
    loss, logits = learner.compute_loss(images, labels)
    grads = torch.autograd.grad(loss, trainable(learner))
    return eval_logits, loss.detach(), logits.detach(), grads


def assert_step_equivalent(learner, images, labels, backend, tol, exactly_zero=None):
    """Reference and fast backends agree on eval logits, loss, training logits and every gradient.

    ``exactly_zero``: {tensor name: name of a tensor whose gradient sets the scale} for gradients that are zero
    in exact arithmetic (e.g. CaPT ``attn``'s key bias: the softmax over keys cancels it). Both paths must give
    round-off next to that scale; comparing round-off with round-off has no relative accuracy.
    """
    exactly_zero = exactly_zero or {}
    learner.backend = "reference"
    ref = step_outputs(learner, images, labels)
    learner.backend = backend
    fast = step_outputs(learner, images, labels)
    for name, a, b in zip(("eval logits", "loss", "logits"), fast[:3], ref[:3]):
        assert rel_err(a, b) <= tol, (name, rel_err(a, b))
    names = [n for n, p in learner.named_parameters() if p.requires_grad]
    assert len(fast[3]) == len(ref[3]) == len(names) > 0
    grads = dict(zip(names, zip(fast[3], ref[3])))
    for pname, (g_fast, g_ref) in grads.items():
        if pname in exactly_zero:
            scale = grads[exactly_zero[pname]][1].norm()
            assert scale > 0 and max(g_fast.norm(), g_ref.norm()) <= 10 * tol * scale, pname
            continue
        assert g_ref.abs().sum() > 0, f"reference gradient of {pname} is zero: the test would prove nothing"
        assert rel_err(g_fast, g_ref) <= tol, (pname, rel_err(g_fast, g_ref))
    return ref


def labels_for(n_cls, batch):
    return torch.arange(batch) % n_cls


# ---------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("kwargs", [{}, {"ctx_init": "", "n_ctx": 3, "dataset": "dtd"}], ids=["default", "random-dtd"])
def test_kgcoop_fast_equals_reference(tiny_model, backend, kwargs):
    learner = fastprompt.create_learner("kgcoop", tiny_model, NAMES, **kwargs)
    perturb(learner)
    x = images_for(tiny_model, 3, torch.float64)
    assert_step_equivalent(learner, x, labels_for(len(NAMES), 3), backend, TOL[torch.float64])


def test_kgcoop_float32_and_one_class():
    model = tiny_clip(dtype=torch.float32)
    learner = fastprompt.create_learner("kgcoop", model, NAMES)
    assert_step_equivalent(learner, images_for(model, 2, torch.float32), labels_for(4, 2), "auto", TOL[torch.float32])
    one = fastprompt.create_learner("kgcoop", tiny_clip(), ["dog"])
    perturb(one)
    assert_step_equivalent(one, images_for(one.clip, 2, torch.float64), torch.zeros(2, dtype=torch.long), "auto", 1e-10)


# ---------------------------------------------------------------------- the loss is the official formula
def test_kgcoop_loss_matches_formula():
    model = tiny_clip()
    learner = fastprompt.create_learner("kgcoop", model, NAMES, dataset="oxford_pets", w=8.0, backend="reference")
    perturb(learner)
    x, y = images_for(model, 3, torch.float64), torch.tensor([1, 0, 3])
    learner.train()
    loss, logits = learner.compute_loss(x, y)
    # Written out independently: the template features straight from clip.encode_text of the pets template.
    prompts = [f"a photo of a {n.replace('_', ' ')}, a type of pet." for n in NAMES]
    w = F.normalize(model.encode_text(torch.as_tensor(learner.tokenizer(prompts))), dim=-1)
    t = F.normalize(learner.class_text_features(), dim=-1)
    v = F.normalize(model.encode_image(x), dim=-1)
    expected_logits = model.logit_scale.exp() * v @ t.t()
    cos = (t * w).sum(-1) / (t.norm(dim=-1) * w.norm(dim=-1))
    expected = F.cross_entropy(expected_logits, y) + 8.0 * (1 - cos.mean())
    assert rel_err(logits, expected_logits) < 1e-12
    assert rel_err(loss, expected) < 1e-12
    assert learner.knowledge_guidance(t) > 0  # the perturbed context moved away from the template


def test_kgcoop_template_table():
    model = tiny_clip()
    dtd = fastprompt.create_learner("kgcoop", model, ["banded"], dataset="DescribableTextures")
    assert dtd.template == "a photo of a {}, a type of texture." == KGCOOP_TEMPLATES["dtd"]
    assert fastprompt.create_learner("kgcoop", model, ["x"], dataset="eurosat").template == "a centered satellite photo of {}."
    assert fastprompt.create_learner("kgcoop", model, ["x"]).template == "a photo of a {}."
    custom = fastprompt.create_learner("kgcoop", model, ["dog"], template="itap of a {}.")
    w = F.normalize(model.encode_text(torch.as_tensor(custom.tokenizer(["itap of a dog."]))), dim=-1)
    assert rel_err(custom.template_features, w) < 1e-14


# ---------------------------------------------------------------------- base -> new, params, save/load, errors
def test_kgcoop_base_to_new_recomputes_template_features():
    model = tiny_clip()
    learner = fastprompt.create_learner("kgcoop", model, NAMES)
    base_w = learner.template_features.clone()
    learner.set_classnames(NEW_NAMES)
    assert learner.template_features.shape == (3, 48) and not torch.equal(learner.template_features[:1], base_w[:1])
    x = images_for(model, 2, torch.float64)
    assert learner.eval()(x).shape == (2, 3)
    assert_step_equivalent(learner, x, torch.tensor([2, 0]), "auto", TOL[torch.float64])


def test_kgcoop_parameters_and_round_trip(tmp_path):
    model = tiny_clip()
    learner = fastprompt.create_learner("kgcoop", model, NAMES, dataset="dtd", w=3.0)
    assert {n for n, p in learner.named_parameters() if p.requires_grad} == {"ctx"}
    assert learner.num_trainable_parameters() == 4 * 64  # M x width (2,048 on ViT-B/16)
    perturb(learner)
    x = images_for(model, 2, torch.float64)
    learner.eval()
    with torch.no_grad():
        before = learner(x)
    learner.save_pretrained(str(tmp_path))
    loaded = fastprompt.from_pretrained(str(tmp_path), clip_model=tiny_clip()).eval()
    assert loaded.config == learner.config
    with torch.no_grad():
        assert torch.equal(loaded(x), before)
    new = fastprompt.from_pretrained(str(tmp_path), clip_model=tiny_clip(), classnames=NEW_NAMES).eval()
    with torch.no_grad():
        assert new(x).shape == (2, 3)


def test_kgcoop_errors():
    model = tiny_clip()
    with pytest.raises(ValueError, match="w must be"):
        fastprompt.create_learner("kgcoop", model, NAMES, w=-1.0)
    with pytest.raises(ValueError, match="slot"):
        fastprompt.create_learner("kgcoop", model, NAMES, template="no slot")
    with pytest.raises(TypeError, match="no option"):
        fastprompt.create_learner("kgcoop", model, NAMES, csc=True)
    learner = fastprompt.create_learner("kgcoop", model, NAMES)
    with pytest.raises(ValueError, match="class_shift"):
        learner.class_text_features(None, torch.zeros(2, 64, dtype=torch.float64))
