"""DePT as a plug-in over coop / cocoop / kgcoop: fast == reference, the loss and fused logits against their
formulas, base -> new (similarity head only), staged learning rates, parameter counts, save/load."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastprompt
from fastprompt.learners.dept import DePT
from tests.conftest import images_for, rel_err, tiny_clip
from tests.learners.test_kgcoop import NAMES, NEW_NAMES, assert_step_equivalent, perturb, trainable

E, D = 48, 64  # tiny_clip: embed dim, text width


@pytest.mark.parametrize("base,kwargs", [("coop", {"n_ctx": 3}), ("cocoop", {}), ("kgcoop", {})])
def test_dept_fast_equals_reference(base, kwargs):
    tiny_model = tiny_clip(custom_text=base == "cocoop")  # both open_clip layouts, one case each
    learner = fastprompt.create_learner("dept", tiny_model, NAMES, base=base, base_config=kwargs)
    perturb(learner)
    x = images_for(tiny_model, 3, torch.float64)
    assert_step_equivalent(learner, x, torch.tensor([3, 0, 1]), "auto", 1e-10)


def test_dept_float32():
    model = tiny_clip(dtype=torch.float32)
    learner = fastprompt.create_learner("dept", model, NAMES, base_config={"n_ctx": 4})
    perturb(learner)
    assert_step_equivalent(learner, images_for(model, 2, torch.float32), torch.tensor([1, 2]), "auto", 1e-5)


def test_dept_kgcoop_loss_and_fused_logits_match_formula():
    model = tiny_clip()
    learner = fastprompt.create_learner("dept", model, NAMES, base="kgcoop", backend="reference")
    assert learner.base.config.w == 2.0 and learner.config.cls_weight == 0.7  # DePT repo's KgCoOp setting
    perturb(learner)
    x, y = images_for(model, 3, torch.float64), torch.tensor([2, 2, 0])
    learner.train()
    loss, _ = learner.compute_loss(x, y)
    # By hand from the unnormalised features and the raw parameters.
    v = model.encode_image(x)
    t = learner.base.class_text_features()
    itm = model.logit_scale.exp() * F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).t()
    ft, fv = learner.film_text, learner.film_img
    rows = torch.cat([ft.scale * t[y] + ft.bias, fv.scale * v + fv.bias])
    cat = rows @ learner.head.weight.t() + learner.head.bias
    w = learner.base.template_features
    kg = 1 - F.cosine_similarity(t, w, dim=1).mean()
    expected = 0.3 * F.cross_entropy(itm, y) + 0.7 * F.cross_entropy(cat, torch.cat([y, y])) + 2.0 * kg
    assert rel_err(loss, expected) < 1e-12
    learner.eval()
    with torch.no_grad():
        fused = learner(x)
    head_only = (fv.scale * v + fv.bias) @ learner.head.weight.t() + learner.head.bias
    assert rel_err(fused, 0.3 * itm + 0.7 * head_only) < 1e-12


def test_dept_base_to_new_uses_similarity_head_only(tmp_path):
    model = tiny_clip()
    learner = fastprompt.create_learner("dept", model, NAMES, base_config={"n_ctx": 2})
    perturb(learner)
    x = images_for(model, 2, torch.float64)
    learner.eval()
    with torch.no_grad():
        base_logits = learner(x)
    learner.save_pretrained(str(tmp_path))
    learner.set_classnames(NEW_NAMES)
    assert not learner.use_head and learner.head.weight.shape == (4, E)
    with torch.no_grad():
        new_logits = learner(x)
        itm = learner.base(x)  # the plain CoOp logits on the new classes
    assert new_logits.shape == (2, 3) and rel_err(new_logits, itm) < 1e-12
    with pytest.raises(ValueError, match="CAT head"):
        learner.compute_loss(x, torch.tensor([0, 1]))
    # Back on the base classes the fused head returns; a subset with use_head=True slices the head's rows.
    learner.set_classnames(NAMES)
    with torch.no_grad():
        assert torch.equal(learner(x), base_logits)
        learner.set_classnames([NAMES[3], NAMES[1]], use_head=True)
        # Every class's logit depends only on its own prompt and head row: the columns of the base logits.
        assert rel_err(learner(x), base_logits[:, [3, 1]]) < 1e-12
    with pytest.raises(ValueError, match="unknown"):
        learner.set_classnames(NEW_NAMES, use_head=True)
    # Reload on new classes: the head keeps its base-class rows, only the ITM head is used.
    loaded = fastprompt.from_pretrained(str(tmp_path), clip_model=tiny_clip(), classnames=NEW_NAMES).eval()
    assert loaded.head.weight.shape == (4, E) and not loaded.use_head
    loaded_base = fastprompt.from_pretrained(str(tmp_path), clip_model=tiny_clip()).eval()
    with torch.no_grad():
        assert torch.equal(loaded_base(x), base_logits)
        assert torch.equal(loaded(x), new_logits)


def test_dept_param_groups_and_counts():
    model = tiny_clip()
    learner = fastprompt.create_learner("dept", model, NAMES)
    assert isinstance(learner, DePT) and learner.base.n_ctx == 16  # DePT-CoOp: 16 random tokens
    groups = learner.param_groups(0.0035)
    assert [g["lr"] for g in groups] == [0.0035, pytest.approx(0.0035 * 6.5)]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in trainable(learner))
    assert {id(p) for p in groups[1]["params"]} == {id(p) for m in (learner.film_text, learner.film_img, learner.head) for p in m.parameters()}
    # 2 x 2E (FiLM) + E*C + C (head) on top of the base's context: DePT's module layout.
    assert learner.num_trainable_parameters() == 16 * D + 2 * 2 * E + E * len(NAMES) + len(NAMES)


def test_dept_errors():
    model = tiny_clip()
    with pytest.raises(ValueError, match="does not support"):
        fastprompt.create_learner("dept", model, NAMES, base="dept")
    with pytest.raises(ValueError, match="cls_weight"):
        fastprompt.create_learner("dept", model, NAMES, cls_weight=1.5)
    with pytest.raises(TypeError, match="no option"):
        fastprompt.create_learner("dept", model, NAMES, base_config={"bogus": 1})


# ---------------------------------------------------------------------- DePT over the deep-prompting learners
@pytest.mark.parametrize("base,base_config", [
    ("maple", {"prompt_depth": 3}),
    ("promptsrc", {"prompt_depth_text": 3, "prompt_depth_vision": 3}),
])
def test_dept_over_deep_prompting_fast_equals_reference(base, base_config):
    from tests.learners.test_maple import tiny_deep_clip

    model = tiny_deep_clip()
    learner = fastprompt.create_learner("dept", model, NAMES, base=base, base_config=base_config)
    perturb(learner)
    assert_step_equivalent(learner, images_for(model, 3, torch.float64), torch.tensor([0, 2, 3]), "auto", 1e-10)
    # The trainer's hooks reach the base (PromptSRC's Gaussian prompt aggregation runs in on_epoch_end).
    learner.on_epoch_end(0, 2)
