"""MaPLe: fast path == official reference (loss, logits, every gradient), the official encoders transcribed
independently, the "of a" initialisation quirk, parameter count, base -> new and save / load."""
from __future__ import annotations

import pytest
import torch

import fastprompt
from fastprompt._extension import extension_loaded
from tests.conftest import images_for, rel_err, tiny_clip

FAST_BACKENDS = ["torch", "auto"] + (["compiled"] if extension_loaded() else [])
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
NAMES = ["golden retriever", "Lamborghini Gallardo LP 570-4 Superleggera 2012", "a_b_c", "cat"]


# ---------------------------------------------------------------------- helpers shared by the deep-prompt tests
def tiny_deep_clip(dtype=torch.float64, vision_layers: int = 3, text_layers: int = 3):
    """``tiny_clip`` with as many vision as text layers, so deep prompts reach the last block of both towers."""
    return tiny_clip(dtype=dtype, vision_layers=vision_layers, text_layers=text_layers)


def perturb(learner, scale=0.05):
    """Move every trainable tensor off its init (e.g. MaPLe's identical deep projections) so gradients differ."""
    with torch.no_grad():
        for p in learner.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)


def step(learner, images, labels):
    """(loss, logits, grads of every trainable tensor) of one training step."""
    params = [p for p in learner.parameters() if p.requires_grad]
    loss, logits = learner.compute_loss(images, labels)
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), logits.detach(), grads


def assert_step_equivalent(learner, images, labels, backend, tol):
    learner.train()
    learner.backend = "reference"
    ref = step(learner, images, labels)
    learner.backend = backend
    fast = step(learner, images, labels)
    assert rel_err(fast[0], ref[0]) <= tol, ("loss", rel_err(fast[0], ref[0]))
    assert rel_err(fast[1], ref[1]) <= tol, ("logits", rel_err(fast[1], ref[1]))
    assert len(fast[2]) == len(ref[2]) > 0
    names = [n for n, p in learner.named_parameters() if p.requires_grad]
    for name, g_fast, g_ref in zip(names, fast[2], ref[2]):
        assert g_ref.abs().sum() > 0, f"reference gradient of {name} is zero: the test would prove nothing"
        assert rel_err(g_fast, g_ref) <= tol, (name, rel_err(g_fast, g_ref))


def assert_forward_equivalent(learner, images, backend, tol):
    """forward() logits and the gradients of sum(logits * u) (for cases where the loss is constant, e.g. one
    class under cross-entropy)."""
    params = [p for p in learner.parameters() if p.requires_grad]
    learner.backend = "reference"
    ref = learner(images)
    u = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * u).sum(), params)
    learner.backend = backend
    fast = learner(images)
    g_fast = torch.autograd.grad((fast * u).sum(), params)
    assert rel_err(fast, ref) <= tol
    for a, b in zip(g_fast, g_ref):
        assert b.abs().sum() > 0 and rel_err(a, b) <= tol


def assert_roundtrip(learner, model, new_names, tmp_path, images):
    """save_pretrained -> from_pretrained(clip_model=) on other classes gives the same logits as
    set_classnames on the original, on both backends."""
    perturb(learner)
    learner.save_pretrained(str(tmp_path))
    loaded = fastprompt.from_pretrained(str(tmp_path), clip_model=model, classnames=new_names)
    learner.set_classnames(new_names)
    learner.eval()
    loaded.eval()
    for backend in ("reference", "auto"):
        learner.backend = loaded.backend = backend
        with torch.no_grad():
            a, b = learner(images), loaded(images)
        assert a.shape == (images.shape[0], len(new_names))
        assert rel_err(b, a) <= 1e-12
    for (n1, p1), (n2, p2) in zip(learner.trainable_state_dict().items(), loaded.trainable_state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


# ---------------------------------------------------------------------- official MaPLe encoders, transcribed
def official_maple_text(model, learner):
    """The official MaPLe TextEncoder: full-length prompts, LND blocks with the (x, deep list, counter) triple."""
    text = learner.text
    C, M = len(learner.classnames), learner.n_ctx
    prompts = torch.cat([text.token_embeds[:, :1], learner.ctx.expand(C, -1, -1), text.token_embeds[:, 1 + M :]], 1)
    deep = list(learner.compound_prompts_text)
    x = (prompts + model.positional_embedding).permute(1, 0, 2)  # LND
    counter = 0
    for i, blk in enumerate(model.transformer.resblocks):
        if i > 0 and len(deep) > 0 and not counter > len(deep) - 1:
            x = torch.cat([x[:1], deep[counter].expand(C, -1, -1).permute(1, 0, 2), x[1 + M :]], dim=0)
            counter += 1
        x = blk(x.permute(1, 0, 2), attn_mask=model.attn_mask).permute(1, 0, 2)  # open_clip blocks are NLD
    x = model.ln_final(x.permute(1, 0, 2))
    return x[torch.arange(C), text.token_ids.argmax(-1)] @ model.text_projection


def official_maple_vision(model, learner, images):
    """The official VisionTransformer_MaPLe: prompts appended after the positional embedding, before ln_pre;
    before block i >= 1 the last M rows are replaced by the next projected deep prompt (counter)."""
    v = model.visual
    shared = learner.proj(learner.ctx)
    deep = [lin(p) for lin, p in zip(learner.compound_prompt_projections, learner.compound_prompts_text)]
    x = v.conv1(images).flatten(2).permute(0, 2, 1)
    x = torch.cat([v.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype), x], dim=1)
    x = x + v.positional_embedding
    x = torch.cat([x, shared.expand(x.shape[0], -1, -1)], dim=1)
    x = v.ln_pre(x).permute(1, 0, 2)
    M, counter = learner.n_ctx, 0
    for i, blk in enumerate(v.transformer.resblocks):
        if i > 0 and len(deep) > 0 and not counter > len(deep) - 1:
            x = torch.cat([x[: x.shape[0] - M], deep[counter].expand(x.shape[1], -1, -1).permute(1, 0, 2)], dim=0)
            counter += 1
        x = blk(x.permute(1, 0, 2)).permute(1, 0, 2)
    x = v.ln_post(x.permute(1, 0, 2)[:, 0])
    return x @ v.proj


# ---------------------------------------------------------------------- tests
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_maple_fast_equals_reference(backend, depth):
    model = tiny_deep_clip()
    learner = fastprompt.create_learner("maple", model, NAMES, prompt_depth=depth)
    perturb(learner)
    assert_step_equivalent(learner, images_for(model, 3, torch.float64), torch.tensor([1, 0, 3]), backend, TOL[torch.float64])


def test_maple_one_class_float32():
    model = tiny_deep_clip(torch.float32)
    learner = fastprompt.create_learner("maple", model, NAMES, prompt_depth=3)
    perturb(learner)
    assert_step_equivalent(learner, images_for(model, 2, torch.float32), torch.tensor([2, 1]), "auto", TOL[torch.float32])
    one = fastprompt.create_learner("maple", tiny_deep_clip(), ["dog"], prompt_depth=3)
    perturb(one)
    assert_forward_equivalent(one, images_for(model, 2, torch.float64), "auto", TOL[torch.float64])


def test_maple_matches_official_transcription():
    model = tiny_deep_clip()
    learner = fastprompt.create_learner("maple", model, NAMES, prompt_depth=3)
    perturb(learner)
    images = images_for(model, 2, torch.float64)
    for backend in ("reference", "auto"):
        learner.backend = backend
        assert rel_err(learner.text_features(), official_maple_text(model, learner)) <= 1e-12
        assert rel_err(learner.image_features(images), official_maple_vision(model, learner, images)) <= 1e-12
    # The deep prompts really act: dropping them changes the features.
    learner.backend = "reference"
    with torch.no_grad():
        learner.compound_prompts_text[1].add_(1.0)
    assert rel_err(learner.text_features(), official_maple_text(model, learner)) <= 1e-12
    learner.compound_prompts_text = torch.nn.ParameterList()
    assert rel_err(learner.text_features(), official_maple_text(model, learner)) <= 1e-12


def test_maple_of_a_quirk():
    """n_ctx=2 from "a photo of a": "a photo" is learned, "of a" stays as fixed words before the name."""
    model = tiny_deep_clip()
    learner = fastprompt.create_learner("maple", model, ["dog", "red panda"], prompt_depth=2)
    tok = learner.tokenizer
    plan = learner.text.plan
    assert learner.n_ctx == 2 and learner.prompt_prefix == "a photo of a"
    assert torch.equal(plan.token_ids[0], torch.as_tensor(tok(["a photo of a dog."]))[0])
    ids = tok.encode("a photo of a")
    emb = model.token_embedding.weight
    assert torch.equal(learner.ctx.detach(), emb[ids[:2]])
    assert learner.text.prefix_ctx_positions == [1, 2]
    assert plan.prefix_len == 5  # SOS, ctx1, ctx2, "of", "a": the fixed words are part of the shared prefix
    assert torch.equal(learner.text.fixed_prefix[0, 3:5], emb[ids[2:4]])
    with pytest.raises(ValueError, match="BPE tokens"):  # the old contract stays for CoOp-style plans
        fastprompt.classplan.build_class_plan(["dog"], tok, 2, "a photo of a")
    with pytest.raises(ValueError, match="class_token_position='end'"):
        fastprompt.classplan.build_class_plan(["dog"], tok, 2, "a photo of a", "middle", fixed_prefix_tail=True)


def test_maple_parameter_count_vitb16(vitb16_f64):
    model, tokenizer = vitb16_f64
    learner = fastprompt.create_learner("maple", model, ["dog", "cat"], tokenizer=tokenizer)
    # ctx 2x512 + proj 512x768+768 + 8 x (2x512 + 512x768+768) = 9 x (1,024 + 393,984)
    assert learner.num_trainable_parameters() == 3_555_072
    assert learner.ctx.shape == (2, 512) and learner.proj.weight.shape == (768, 512)
    assert len(learner.compound_prompts_text) == 8 and len(learner.compound_prompt_projections) == 8
    # official: one Linear deep-copied, so every deep projection starts identical
    w0 = learner.compound_prompt_projections[0].weight
    assert all(torch.equal(lin.weight, w0) for lin in learner.compound_prompt_projections)
    assert sorted(learner.vision_prompts()) == list(range(9)) and sorted(learner.text_deep_prompts()) == list(range(1, 9))


def test_maple_errors():
    model = tiny_deep_clip()
    for depth in (0, 4):
        with pytest.raises(ValueError, match="prompt_depth"):
            fastprompt.create_learner("maple", model, NAMES, prompt_depth=depth)
    with pytest.raises(TypeError, match="no option"):
        fastprompt.create_learner("maple", model, NAMES, depth=3)
    learner = fastprompt.create_learner("maple", model, NAMES, prompt_depth=2)
    with pytest.raises(ValueError, match="images must be"):
        learner(torch.randn(2, 3, 16, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="class_shift"):
        learner.class_text_features(class_shift=torch.zeros(2, 64, dtype=torch.float64))


def test_maple_class_shift_plugin():
    """CaPT hook: a per-class shift of the input context, fast (diagonal pairs) == reference."""
    model = tiny_deep_clip()
    learner = fastprompt.create_learner("maple", model, NAMES, prompt_depth=3)
    shift = torch.randn(len(NAMES), 64, dtype=torch.float64, requires_grad=True)
    out = {}
    for backend in ("reference", "auto"):
        learner.backend = backend
        t = learner.class_text_features(class_shift=shift)
        w = torch.ones_like(t)
        out[backend] = (t, torch.autograd.grad((t * w).sum(), (shift, learner.ctx, learner.compound_prompts_text[0])))
    assert rel_err(out["auto"][0], out["reference"][0]) <= 1e-10
    for a, b in zip(out["auto"][1], out["reference"][1]):
        assert rel_err(a, b) <= 1e-10


def test_maple_base_to_new_roundtrip(tmp_path):
    model = tiny_deep_clip()
    learner = fastprompt.create_learner("maple", model, NAMES[:2], prompt_depth=3)
    assert_roundtrip(learner, model, ["red panda", "dog", "Mexican hairless dog (xoloitzcuintli)"], tmp_path, images_for(model, 2, torch.float64))
