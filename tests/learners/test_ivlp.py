"""IVLP: fast path == official reference, the official IVLP blocks transcribed, parameter count, base -> new,
save / load."""
from __future__ import annotations

import pytest
import torch

import fastprompt
from tests.conftest import rel_err
from tests.learners.test_maple import (
    FAST_BACKENDS, NAMES, TOL, assert_roundtrip, assert_step_equivalent, images_for, perturb, tiny_deep_clip,
)


def official_ivlp(model, learner, images):
    """The official IVLP encoders (``ResidualAttentionBlock_IVLP``): block i in 1..depth-1 owns a prompt that
    replaces rows 1..n (text) / the last n rows (vision) of its input; VPT is appended before ln_pre."""
    p, text = learner.prompts, learner.text
    C, M = len(learner.classnames), p.n_ctx_text
    x = torch.cat([text.token_embeds[:, :1], p.ctx.expand(C, -1, -1), text.token_embeds[:, 1 + M :]], 1)
    x = x + model.positional_embedding
    for i, blk in enumerate(model.transformer.resblocks):
        if 0 < i <= len(p.text_deep):
            x = torch.cat([x[:, :1], p.text_deep[i - 1].expand(C, -1, -1), x[:, 1 + M :]], dim=1)
        x = blk(x, attn_mask=model.attn_mask)
    t = model.ln_final(x)[torch.arange(C), text.token_ids.argmax(-1)] @ model.text_projection
    v = model.visual
    y = v.conv1(images).flatten(2).permute(0, 2, 1)
    y = torch.cat([v.class_embedding.expand(y.shape[0], 1, -1), y], dim=1) + v.positional_embedding
    if p.vpt is not None:
        y = torch.cat([y, p.vpt.expand(y.shape[0], -1, -1)], dim=1)
    y = v.ln_pre(y)
    for i, blk in enumerate(v.transformer.resblocks):
        if 0 < i <= len(p.vpt_deep):
            n = p.vpt.shape[0]
            y = torch.cat([y[:, : y.shape[1] - n], p.vpt_deep[i - 1].expand(y.shape[0], -1, -1)], dim=1)
        y = blk(y)
    return t, v.ln_post(y[:, 0]) @ v.proj


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("depths", [(1, 0), (3, 3), (2, 1)])
def test_ivlp_fast_equals_reference(backend, depths):
    model = tiny_deep_clip()
    learner = fastprompt.create_learner(
        "ivlp", model, NAMES, prompt_depth_text=depths[0], prompt_depth_vision=depths[1], n_ctx_vision=3
    )
    perturb(learner)
    assert_step_equivalent(learner, images_for(model, 3, torch.float64), torch.tensor([3, 0, 1]), backend, TOL[torch.float64])


def test_ivlp_float32_four_tokens():
    model = tiny_deep_clip(torch.float32)
    learner = fastprompt.create_learner("ivlp", model, NAMES, n_ctx_text=4, n_ctx_vision=4, prompt_depth_text=3, prompt_depth_vision=3)
    perturb(learner)
    assert_step_equivalent(learner, images_for(model, 2, torch.float32), torch.tensor([0, 2]), "auto", TOL[torch.float32])


def test_ivlp_matches_official_transcription():
    model = tiny_deep_clip()
    learner = fastprompt.create_learner("ivlp", model, NAMES, prompt_depth_text=3, prompt_depth_vision=2)
    perturb(learner)
    images = images_for(model, 2, torch.float64)
    t_off, v_off = official_ivlp(model, learner, images)
    for backend in ("reference", "auto"):
        learner.backend = backend
        assert rel_err(learner.text_features(), t_off) <= 1e-12
        assert rel_err(learner.image_features(images), v_off) <= 1e-12


def test_ivlp_parameter_count_vitb16(vitb16_f64):
    model, tokenizer = vitb16_f64
    learner = fastprompt.create_learner("ivlp", model, ["dog", "cat"], tokenizer=tokenizer)
    # official 2+2 ctx, depth 12 / 12: 12 x 2 x 512 + 12 x 2 x 768
    assert learner.num_trainable_parameters() == 30_720
    assert learner.prompts.prompt_prefix == "a photo of a" and learner.text.plan.prefix_len == 5
    assert sorted(learner.prompts.vision_prompts()) == list(range(12))


def test_ivlp_errors():
    model = tiny_deep_clip()
    with pytest.raises(ValueError, match="prompt_depth_text"):
        fastprompt.create_learner("ivlp", model, NAMES, prompt_depth_text=0)
    with pytest.raises(ValueError, match="prompt_depth_vision"):
        fastprompt.create_learner("ivlp", model, NAMES, prompt_depth_vision=4, prompt_depth_text=3)
    with pytest.raises(ValueError, match="fewer than n_ctx"):
        fastprompt.create_learner("ivlp", model, NAMES, n_ctx_text=3, ctx_init="a photo", prompt_depth_text=1, prompt_depth_vision=1)


def test_ivlp_base_to_new_roundtrip(tmp_path):
    model = tiny_deep_clip()
    learner = fastprompt.create_learner("ivlp", model, NAMES[:3], prompt_depth_text=3, prompt_depth_vision=3)
    assert_roundtrip(learner, model, ["cat", "dog"], tmp_path, images_for(model, 2, torch.float64))
