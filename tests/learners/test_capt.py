"""CaPT / DeCaPT: fast == reference over every base, the margin-ITM loss on hand-computed cases, TCI and its
recomputation on new classes, the official initialisation and parameter counts, defaults, save/load."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

import fastprompt
from fastprompt.losses import class_similarity, margin_itm_loss
from tests.conftest import images_for, rel_err, tiny_clip
from tests.learners.test_kgcoop import NAMES, NEW_NAMES, assert_step_equivalent, perturb, trainable

D = 64


# ---------------------------------------------------------------------- margin-ITM loss by hand
def test_margin_itm_loss_hand_cases():
    logits = torch.tensor([[10.0, 20.0, 30.0], [5.0, -5.0, 0.0]], dtype=torch.float64)
    sim = torch.tensor([[1.0, 0.5, 0.2], [0.5, 1.0, 0.4], [0.2, 0.4, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    # Row 0 (y=0): m1 = 0.1*0.5/2 = 0.025, m2 = 0.1*0.2/2 = 0.01, m0 = -0.035 -> logits - 100 m = [13.5, 17.5, 29].
    # Row 1 (y=1): m0 = 0.1*0.5/2 = 0.025, m2 = 0.1*0.4/2 = 0.02, m1 = -0.045 -> [2.5, -0.5, -2].
    z0, z1 = torch.tensor([13.5, 17.5, 29.0], dtype=torch.float64), torch.tensor([2.5, -0.5, -2.0], dtype=torch.float64)
    expected = 0.5 * ((torch.logsumexp(z0, 0) - z0[0]) + (torch.logsumexp(z1, 0) - z1[1]))
    assert abs(float(margin_itm_loss(logits, y, sim, 0.1)) - float(expected)) < 1e-12
    # No similarity matrix: S = 1 everywhere -> row 0: m = [-0.1, 0.05, 0.05] -> [20, 15, 25].
    z = torch.tensor([20.0, 15.0, 25.0], dtype=torch.float64)
    got = margin_itm_loss(logits[:1], y[:1], None, 0.1)
    assert abs(float(got) - float(torch.logsumexp(z, 0) - z[0])) < 1e-12
    # smooth = 0 and a single class are plain cross-entropy.
    assert torch.equal(margin_itm_loss(logits, y, sim, 0.0), F.cross_entropy(logits, y))
    assert torch.equal(margin_itm_loss(logits[:, :1], torch.zeros(2, dtype=torch.long), None, 0.1), F.cross_entropy(logits[:, :1], torch.zeros(2, dtype=torch.long)))
    # The gradient flows to the logits as a plain CE on the shifted logits (the margin is a constant).
    l = logits.clone().requires_grad_()
    (g,) = torch.autograd.grad(margin_itm_loss(l, y, sim, 0.1), [l])
    assert rel_err(g[0], (F.softmax(z0, 0) - F.one_hot(torch.tensor(0), 3)) / 2) < 1e-12
    with pytest.raises(ValueError, match="similarity"):
        margin_itm_loss(logits, y, sim[:2, :2], 0.1)
    with pytest.raises(ValueError, match="labels"):
        margin_itm_loss(logits, y[:1], sim, 0.1)


# ---------------------------------------------------------------------- fast == reference
@pytest.mark.parametrize("name,kwargs", [
    ("capt", {}),  # over CoOp, default dropout 0.1 active in training (same masks on both paths)
    ("capt", {"base": "kgcoop"}),
    ("capt", {"base": "prograd", "dropout": 0.0}),
    ("decapt", {"dropout": 0.0}),
    ("capt", {"module": "linear"}),  # the official alternative conditioning modules (test_capt_modules.py)
    ("capt", {"module": "attn"}),
    ("decapt", {"module": "linear"}),
    ("decapt", {"module": "attn"}),
])
def test_capt_fast_equals_reference(name, kwargs):
    # both open_clip layouts
    tiny_model = tiny_clip(custom_text=kwargs.get("base") == "kgcoop" or "module" in kwargs and name == "decapt")
    learner = fastprompt.create_learner(name, tiny_model, NAMES, **kwargs)
    perturb(learner)
    x = images_for(tiny_model, 3, torch.float64)
    assert_step_equivalent(learner, x, torch.tensor([1, 3, 0]), "auto", 1e-10, dead_gradients(kwargs))


def dead_gradients(kwargs):
    """``attn``'s key bias has an exactly zero gradient (the softmax over keys cancels it), as officially."""
    return {"transfer.k_proj.bias": "transfer.k_proj.weight"} if kwargs.get("module") == "attn" else None


@pytest.mark.parametrize("module", ["mlp", "attn"])
def test_capt_float32_torch_backend(module):
    model = tiny_clip(dtype=torch.float32)
    learner = fastprompt.create_learner("decapt", model, NAMES, dataset="dtd", module=module)
    perturb(learner)
    assert_step_equivalent(learner, images_for(model, 2, torch.float32), torch.tensor([2, 1]), "torch", 1e-5,
                           dead_gradients({"module": module}))


@pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="Triton needs a GPU or TRITON_INTERPRET=1",
)
@pytest.mark.parametrize("module", ["mlp", "linear"])
def test_capt_on_triton_kernels(module):
    """Engine ops and the condition op on their Triton kernels (CaPT form: LeakyReLU, scaled input; ``linear``:
    the one-layer form with the scale fused)."""
    model = tiny_clip(dtype=torch.float32)
    learner = fastprompt.create_learner("capt", model, NAMES[:3], dropout=0.0, module=module,
                                        base_config={"n_ctx": 2, "ctx_init": ""})
    perturb(learner)
    assert_step_equivalent(learner, images_for(model, 2, torch.float32), torch.tensor([0, 2]), "triton", 1e-5)


# ---------------------------------------------------------------------- TCI, offsets, init, counts
def test_capt_tci_offsets_and_new_classes():
    model = tiny_clip()
    learner = fastprompt.create_learner("capt", model, NAMES, dataset="dtd", base="kgcoop", backend="reference")
    tok = learner.tokenizer
    tci = model.encode_text(torch.as_tensor(tok([f"{n.replace('_', ' ')} texture." for n in NAMES])))
    assert rel_err(learner.class_info, tci) < 1e-14  # unnormalised, CoOp's "{} texture." (not KgCoOp's)
    assert learner.base.template == "a photo of a {}, a type of texture."
    assert rel_err(learner.class_sim, F.cosine_similarity(tci[:, None], tci[None], dim=-1)) < 1e-14
    # Offsets MLP(scale * TCI) are non-zero at init and added to every context token of their class.
    mlp = learner.transfer
    expected = F.linear(F.leaky_relu(F.linear(1.0 * tci, mlp.down.weight, mlp.down.bias), 0.01), mlp.up.weight, mlp.up.bias)
    offsets = learner.class_offsets()
    assert rel_err(offsets, expected) < 1e-14 and offsets.norm() > 0
    text = learner.base.text
    ctx = learner.base.ctx[None] + offsets[:, None]
    prompts = torch.cat([text.token_embeds[:, :1], ctx, text.token_embeds[:, 5:]], dim=1)
    assert rel_err(learner.class_text_features(), text.reference_features(prompts, text.token_ids)) < 1e-14
    # New classes: new TCI, new S, logits of the new width.
    learner.set_classnames(NEW_NAMES)
    assert learner.class_info.shape == (3, 48) and learner.class_sim.shape == (3, 3)
    new_tci = model.encode_text(torch.as_tensor(tok([f"{n} texture." for n in NEW_NAMES])))
    assert rel_err(learner.class_info, new_tci) < 1e-14
    x = images_for(model, 2, torch.float64)
    with torch.no_grad():
        assert learner.eval()(x).shape == (2, 3)
    learner.backend = "auto"
    assert_step_equivalent(learner, x, torch.tensor([2, 0]), "auto", 1e-10)


def test_capt_init_and_parameter_counts_on_vit_b16():
    model, _, tokenizer = fastprompt.load_clip("ViT-B-16", pretrained=None)
    learner = fastprompt.create_learner("capt", model, ["dog", "cat"], tokenizer=tokenizer)
    mlp_params = sum(p.numel() for p in learner.transfer.parameters())
    assert mlp_params == 33_312  # 512*32 + 32 + 32*512 + 512 (docs/methods/capt.md)
    assert learner.num_trainable_parameters() == 2_048 + 33_312  # + CoOp's 4 x 512 context
    # Official init: U(+-1/sqrt(out_features)) for weights and biases.
    bound = float(learner.transfer.down.weight.detach().abs().max())
    assert 0.9 / math.sqrt(32) < bound <= 1 / math.sqrt(32)
    assert float(learner.transfer.up.weight.abs().max()) <= 1 / math.sqrt(512) and float(learner.transfer.up.bias.abs().max()) <= 1 / math.sqrt(512)
    decapt = fastprompt.create_learner("decapt", model, ["dog", "cat"], tokenizer=tokenizer)
    assert sum(p.numel() for p in decapt.transfer.parameters()) == 66_112
    # DeCaPT: + 4x512 ctx + 2 FiLM x 2 x 512 + linear head 512*2 + 2.
    assert decapt.num_trainable_parameters() == 66_112 + 2_048 + 2_048 + 1_026


def test_capt_official_defaults_and_param_groups():
    model = tiny_clip()
    coop = fastprompt.create_learner("capt", model, NAMES)
    assert (coop.config.scale, coop.config.hidden_dim, coop.config.dropout, coop.config.smooth) == (0.5, 32, 0.1, 0.0031)
    assert coop.base.n_ctx == 4 and coop.base.prompt_prefix == "a photo of a"
    kg = fastprompt.create_learner("capt", model, NAMES, base="kgcoop")
    assert (kg.config.dropout, kg.config.smooth, kg.base.config.w) == (0.0, 0.001, 1.5)
    de = fastprompt.create_learner("decapt", model, NAMES, dataset="oxford_pets", base_config={"base_config": {"n_ctx": 4}})
    assert (de.config.scale, de.config.hidden_dim, de.config.smooth) == (0.9, 64, 0.0008)
    assert de.base.config.head_lr_mult == 18.0 and de.base.base.config.w == 1.5
    assert de.base.base.config.dataset == "oxford_pets"  # passed down to KgCoOp's template
    groups = de.param_groups(0.0035)
    lrs = {round(g["lr"], 6) for g in groups}
    assert lrs == {0.0035, 0.063}
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in trainable(de))
    head = [g for g in groups if round(g["lr"], 6) == 0.063][0]["params"]
    assert {id(p) for p in head} == {id(p) for m in (de.base.film_text, de.base.film_img, de.base.head) for p in m.parameters()}


def test_capt_decapt_loss_matches_formula():
    model = tiny_clip()
    learner = fastprompt.create_learner("decapt", model, NAMES, dropout=0.0, backend="reference")
    perturb(learner)
    x, y = images_for(model, 3, torch.float64), torch.tensor([0, 3, 3])
    learner.train()
    loss, _ = learner.compute_loss(x, y)
    dept, kg = learner.base, learner.base.base
    v, t = model.encode_image(x), learner.class_text_features()
    itm = model.logit_scale.exp() * F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).t()
    rows = torch.cat([dept.film_text(t[y]), dept.film_img(v)])
    cat = dept.head(rows)
    sim = class_similarity(learner.class_info)
    expected = (
        0.3 * margin_itm_loss(itm, y, sim, 0.0008) + 0.7 * F.cross_entropy(cat, torch.cat([y, y]))
        + 1.5 * (1 - F.cosine_similarity(t, kg.template_features, dim=1).mean())
    )
    assert rel_err(loss, expected) < 1e-12


@pytest.mark.parametrize("name,kwargs", [("capt", {}), ("capt", {"base": "prograd"}), ("decapt", {})])
def test_capt_round_trip(tmp_path, name, kwargs):
    model = tiny_clip()
    learner = fastprompt.create_learner(name, model, NAMES, **kwargs)
    perturb(learner)
    x = images_for(model, 2, torch.float64)
    learner.eval()
    with torch.no_grad():
        before = learner(x)
    learner.save_pretrained(str(tmp_path))
    loaded = fastprompt.from_pretrained(str(tmp_path), clip_model=tiny_clip()).eval()
    assert type(loaded) is type(learner) and loaded.config == learner.config
    with torch.no_grad():
        assert torch.equal(loaded(x), before)
        new = fastprompt.from_pretrained(str(tmp_path), clip_model=tiny_clip(), classnames=NEW_NAMES).eval()
        assert new(x).shape == (2, 3)


def test_capt_errors():
    model = tiny_clip()
    with pytest.raises(ValueError, match="does not support"):
        fastprompt.create_learner("capt", model, NAMES, base="cocoop")
    with pytest.raises(ValueError, match="dropout"):
        fastprompt.create_learner("capt", model, NAMES, dropout=1.0)
    with pytest.raises(TypeError, match="base_config"):
        fastprompt.create_learner("capt", model, NAMES, base_config="kgcoop")
    learner = fastprompt.create_learner("capt", model, NAMES)
    with pytest.raises(ValueError, match="class_shift"):
        learner.base.class_text_features(None, torch.zeros(3, D, dtype=torch.float64))


def test_capt_over_dapt_fast_equals_reference():
    """UCPDAPT: the class offset on DAPT's text tokens, plain CE (epsilon 0) plus DAPT's regularisers."""
    from tests.learners.test_maple import tiny_deep_clip

    model = tiny_deep_clip()
    learner = fastprompt.create_learner("capt", model, NAMES, base="dapt", dropout=0.0,
                                        base_config={"vis_num_tokens": 3, "txt_num_tokens": 5})
    assert learner.config.smooth == 0.0 and learner.config.scale == 1.0
    learner.base.set_prototypes(F.normalize(torch.randn(len(NAMES), 48, dtype=torch.float64), dim=-1) * 0.9)
    perturb(learner)
    assert_step_equivalent(learner, images_for(model, 3, torch.float64), torch.tensor([1, 3, 0]), "auto", 1e-10)
