"""Learner API: freezing, save/load, caching, new classes, backends, and clear errors on bad input."""
from __future__ import annotations

import json
import os

import pytest
import torch

import fastprompt
from tests.conftest import tiny_clip

NAMES = ["dog", "cat", "red_panda"]


def images(batch=2, dtype=torch.float64):
    return torch.randn(batch, 3, 32, 32, dtype=dtype)


@pytest.mark.parametrize("method", ["coop", "cocoop"])
def test_only_learnable_tensors_require_grad(method):
    learner = fastprompt.create_learner(method, tiny_clip(), NAMES)
    trainable = {n for n, p in learner.named_parameters() if p.requires_grad}
    assert trainable == set(learner.trainable_state_dict())
    assert all(n.startswith(("ctx", "meta_net")) for n in trainable)
    assert not any(p.requires_grad for p in learner.clip.parameters())
    expected = {"coop": 16 * 64, "cocoop": 4 * 64 + (48 * 3 + 3) + (3 * 64 + 64)}[method]
    assert learner.num_trainable_parameters() == expected


@pytest.mark.parametrize("method,kwargs", [("coop", {}), ("coop", {"csc": True, "n_ctx": 3}), ("cocoop", {})])
def test_save_load_round_trip(tmp_path, method, kwargs):
    model = tiny_clip()
    learner = fastprompt.create_learner(method, model, NAMES, **kwargs)
    with torch.no_grad():
        for p in learner.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    x = images()
    learner.eval()
    with torch.no_grad():
        before = learner(x)
    learner.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["fastprompt_config.json", "prompt_learner.safetensors"]
    meta = json.loads((tmp_path / "fastprompt_config.json").read_text())
    assert meta["method"] == method and meta["classnames"] == ["dog", "cat", "red panda"]
    loaded = fastprompt.from_pretrained(str(tmp_path), clip_model=tiny_clip()).eval()
    with torch.no_grad():
        after = loaded(x)
    assert torch.equal(before, after)


def test_from_pretrained_rebuilds_clip_from_recorded_source(tmp_path):
    # Random weights (pretrained=None): the rebuild is the same backbone only under the same seed (the adapter
    # records a fingerprint of the text tower and refuses another one).
    torch.manual_seed(0)
    model, _, _ = fastprompt.load_clip("ViT-B-16", pretrained=None)
    learner = fastprompt.create_learner("coop", model, NAMES, n_ctx=2)
    learner.save_pretrained(str(tmp_path))
    meta = json.loads((tmp_path / "fastprompt_config.json").read_text())
    assert meta["clip_model"] == "ViT-B-16" and meta["clip_pretrained"] is None
    torch.manual_seed(0)
    loaded = fastprompt.from_pretrained(str(tmp_path))
    assert torch.equal(loaded.ctx, learner.ctx)


def test_from_pretrained_without_source_is_a_clear_error(tmp_path):
    fastprompt.create_learner("coop", tiny_clip(), NAMES).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="pass clip_model"):
        fastprompt.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        fastprompt.from_pretrained(str(tmp_path / "nothing"), clip_model=tiny_clip())


def test_eval_caches_text_features_until_parameters_change():
    learner = fastprompt.create_learner("coop", tiny_clip(), NAMES).eval()
    calls = []
    original = learner._text_features

    def counting():
        calls.append(1)
        return original()

    learner._text_features = counting
    x = images()
    with torch.no_grad():
        first = learner(x)
        second = learner(x)
    assert len(calls) == 1 and torch.equal(first, second)
    with torch.no_grad():
        learner.ctx.add_(0.1)  # an optimizer step changes the parameter in place
        third = learner(x)
    assert len(calls) == 2 and not torch.equal(first, third)
    learner.train()
    learner(x)
    learner(x)
    assert len(calls) == 4  # training never caches


def test_new_classes_reuse_learned_context():
    learner = fastprompt.create_learner("coop", tiny_clip(), NAMES).eval()
    learner.set_classnames(["car", "plane", "boat", "train"])
    with torch.no_grad():
        logits = learner(images())
    assert logits.shape == (2, 4)
    csc = fastprompt.create_learner("coop", tiny_clip(), NAMES, csc=True)
    with pytest.raises(ValueError, match="class-specific"):
        csc.set_classnames(["a", "b"])


def test_backend_is_changeable_and_validated(monkeypatch):
    learner = fastprompt.create_learner("coop", tiny_clip(), NAMES, backend="reference")
    assert learner.backend == "reference"
    learner.backend = "torch"
    assert learner.backend == "torch"
    with pytest.raises(ValueError, match="unknown backend"):
        learner.backend = "warp"
    monkeypatch.setenv("FASTPROMPT_BACKEND", "reference")
    assert fastprompt.create_learner("coop", tiny_clip(), NAMES).backend == "reference"


def test_training_step_reduces_loss():
    torch.manual_seed(0)
    learner = fastprompt.create_learner("coop", tiny_clip(), NAMES, n_ctx=4).train()
    opt = torch.optim.SGD(learner.parameters(), lr=0.5)
    x, y = images(6), torch.tensor([0, 1, 2, 0, 1, 2])
    losses = []
    for _ in range(5):
        loss = learner.loss(learner(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------- bad input
def test_empty_class_list():
    with pytest.raises(ValueError, match="empty"):
        fastprompt.create_learner("coop", tiny_clip(), [])


def test_overlong_class_name_names_the_class():
    name = " ".join(["supercalifragilistic"] * 30)
    with pytest.raises(ValueError, match="supercalifragilistic.*does not fit"):
        fastprompt.create_learner("coop", tiny_clip(), ["dog", name])


def test_bad_images():
    learner = fastprompt.create_learner("coop", tiny_clip(), NAMES)
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        learner(torch.randn(2, 3, 64, 64, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating point"):
        learner(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        learner(torch.randn(3, 32, 32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        learner([[0.0]])


def test_not_an_open_clip_model():
    with pytest.raises(TypeError, match="open_clip model"):
        fastprompt.create_learner("coop", torch.nn.Linear(2, 2), NAMES)


def test_unknown_learner_and_option():
    with pytest.raises(ValueError, match="unknown learner"):
        fastprompt.create_learner("nope", tiny_clip(), NAMES)
    with pytest.raises(TypeError, match="no option"):
        fastprompt.create_learner("coop", tiny_clip(), NAMES, n_context=4)
    with pytest.raises(ValueError, match="class_token_position"):
        fastprompt.create_learner("coop", tiny_clip(), NAMES, class_token_position="left")


def test_non_causal_tower_falls_back_or_errors():
    import open_clip

    model = open_clip.CustomTextCLIP(
        embed_dim=32,
        vision_cfg=open_clip.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16, image_size=32),
        text_cfg=open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1,
                                       no_causal_mask=True, pool_type="last"),
    ).double()
    learner = fastprompt.create_learner("coop", model, NAMES, n_ctx=2)
    assert learner.backend == "reference"  # auto: the engine cannot run a non-causal tower exactly
    with pytest.raises(ValueError, match="not causal"):
        learner.backend = "torch"


def test_load_clip_errors_and_frozen_model(tmp_path):
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        fastprompt.load_clip("ViT-Q-99")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fastprompt.load_clip("ViT-B-16", pretrained=str(tmp_path / "missing.pt"))


def test_load_clip_from_a_checkpoint_path(tmp_path):
    """A checkpoint file on disk goes through open_clip's own loader (real weights for users who have them)."""
    model, _, _ = fastprompt.load_clip("ViT-B-16", pretrained=None)
    with torch.no_grad():
        model.text_projection.mul_(0.5)  # a recognisable change
    path = tmp_path / "vitb16.pt"
    torch.save(model.state_dict(), path)
    loaded, preprocess, tokenizer = fastprompt.load_clip("ViT-B-16", pretrained=str(path))
    assert torch.equal(loaded.text_projection, model.text_projection)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    assert tokenizer(["a dog"]).shape == (1, 77) and callable(preprocess)
