"""PromptKD: fast == official reference (KD loss, logits, every trainable gradient incl. the projector), the KD
loss formula on a hand-computed case, the teacher's text features computed once on the fast path, BatchNorm
modes, save / load round trips (BN running stats travel), base -> new, construction errors.

Student: ``tests.conftest.tiny_clip`` (width 64, embed 48). Teacher: a PromptSRC on a *different* tiny CLIP
(width 96, embed 40), so the projector maps 48 -> 40 as ViT-B/16 512 -> ViT-L/14 768 does."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastprompt
from fastprompt.learners.promptkd import PromptKD, kd_loss
from tests.conftest import randomize_layernorms, rel_err, tiny_clip

TOL = 1e-10
NAMES = ["dog", "Lamborghini Gallardo LP 570-4 Superleggera 2012", "cat", "golden retriever", "a_b_c"]
T_KW = {"n_ctx_text": 2, "n_ctx_vision": 3, "prompt_depth_text": 2, "prompt_depth_vision": 2}
S_KW = {"n_ctx_vision": 3, "prompt_depth_vision": 2}


def teacher_clip():
    import open_clip

    vision = open_clip.CLIPVisionCfg(layers=2, width=96, head_width=32, patch_size=16, image_size=32)
    text = open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=96, heads=4, layers=2)
    torch.manual_seed(5)
    return randomize_layernorms(open_clip.CLIP(embed_dim=40, vision_cfg=vision, text_cfg=text)).double().eval()


def make_teacher(names=NAMES, clip=None):
    t = fastprompt.create_learner("promptsrc", clip if clip is not None else teacher_clip(), names, **T_KW)
    with torch.no_grad():  # a "trained" teacher: off the init
        for p in t.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return t


def make_kd(names=NAMES, **kw):
    return PromptKD(tiny_clip(), names, teacher=make_teacher(names), **{**S_KW, **kw})


def images(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def named_trainable(m):
    return [(n, p) for n, p in m.named_parameters() if p.requires_grad]


def step(kd, backend, x):
    kd.backend = backend
    loss, logits = kd.compute_loss(x, torch.zeros(x.shape[0], dtype=torch.long))
    return loss.detach(), logits.detach(), torch.autograd.grad(loss, [p for _, p in named_trainable(kd)])


def test_trainable_tensors_and_projector_layers():
    kd = make_kd()
    names = [n for n, _ in named_trainable(kd)]
    assert names == ["vpt", "vpt_deep.0", "projector.0.weight", "projector.0.bias", "projector.1.weight",
                     "projector.1.bias", "projector.3.weight", "projector.3.bias"]
    conv1, bn, relu, conv2 = kd.projector
    assert isinstance(conv1, torch.nn.Conv2d) and conv1.kernel_size == (1, 1)
    assert (conv1.in_channels, conv1.out_channels) == (48, 40)
    assert isinstance(bn, torch.nn.BatchNorm2d) and isinstance(relu, torch.nn.ReLU)
    assert isinstance(conv2, torch.nn.Conv2d) and (conv2.in_channels, conv2.out_channels) == (40, 40)
    assert not any(p.requires_grad for p in kd.teacher.parameters()) and not kd.teacher.training


def test_fast_equals_reference_train_step():
    kd = make_kd().train()
    x = images(4)
    ref, fast = step(kd, "reference", x), step(kd, "torch", x)
    assert rel_err(fast[0], ref[0]) <= TOL and rel_err(fast[1], ref[1]) <= TOL
    for (name, _), g, r in zip(named_trainable(kd), fast[2], ref[2]):
        if name == "projector.0.bias":
            # Training-mode BatchNorm subtracts the batch mean: the first conv's bias has exactly zero gradient,
            # so both paths hold rounding noise only (compared in eval mode below).
            scale = ref[2][2].norm()
            assert g.norm() <= 1e-10 * scale and r.norm() <= 1e-10 * scale
            continue
        assert r.abs().sum() > 0 and rel_err(g, r) <= TOL, (name, rel_err(g, r))


def test_fast_equals_reference_eval_logits_and_gradients():
    kd = make_kd()
    kd.train()
    kd.compute_loss(images(4, 3), None)  # non-trivial running statistics
    kd.eval()
    x = images(3)
    outs = {}
    for backend in ("reference", "torch"):
        kd.backend = backend
        out = kd(x)
        w = torch.arange(out.numel(), dtype=out.dtype).view_as(out)
        outs[backend] = (out.detach(), torch.autograd.grad((out * w).sum(), [p for _, p in named_trainable(kd)]))
    assert rel_err(outs["torch"][0], outs["reference"][0]) <= TOL
    for (name, _), g, r in zip(named_trainable(kd), outs["torch"][1], outs["reference"][1]):
        assert r.abs().sum() > 0 and rel_err(g, r) <= TOL, name


def test_kd_loss_hand_computed():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], dtype=torch.float64)
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, -2.0]], dtype=torch.float64)
    T = 2.0
    total = 0.0  # sum_ij p_t (log p_t - log p_s), in plain Python floats
    for i in range(2):
        zs = [float(v) / T for v in s[i]]
        zt = [float(v) / T for v in t[i]]
        ls = [z - math.log(sum(math.exp(u) for u in zs)) for z in zs]
        lt = [z - math.log(sum(math.exp(u) for u in zt)) for z in zt]
        total += sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))
    expected = total * T * T / 6
    assert abs(kd_loss(s, t, T).item() - expected) <= 1e-12 * abs(expected)
    with pytest.raises(ValueError, match="logits"):
        kd_loss(s, t[:1], T)


def test_compute_loss_is_the_official_formula():
    kd = make_kd(kd_weight=7.0, temperature=1.5).train()
    x = images(3)
    kd.backend = "reference"
    loss, logits = kd.compute_loss(x, torch.tensor([0, 1, 2]))
    # by hand from the pieces: teacher text [C, E_t], teacher image, student + projector
    with torch.no_grad():
        text = F.normalize(kd.teacher.text_features(), dim=-1)
        tv = F.normalize(kd.teacher.image_features(x), dim=-1)
        t_logits = kd.teacher.clip.logit_scale.exp() * tv @ text.t()
    kd.projector.train()
    v = kd.clip.visual  # the official student: prompted ViT (reference loop), then the conv projector
    sv = kd.project(fastprompt.learners._deep_prompts.vision_encoder(kd)(x, kd.vision_prompts(), fast=False))
    s_logits = kd.clip.logit_scale.exp() * F.normalize(sv, dim=-1) @ text.t()
    p_t = F.softmax(t_logits / 1.5, dim=1)
    expected = 7.0 * (p_t * (p_t.log() - F.log_softmax(s_logits / 1.5, dim=1))).sum() * 1.5 ** 2 / s_logits.numel()
    assert v is kd.clip.visual and rel_err(logits, s_logits) <= 1e-12 and rel_err(loss, expected) <= 1e-12


def test_teacher_text_encoded_once_on_the_fast_path(monkeypatch):
    kd = make_kd().train()
    calls = []
    real = kd.teacher.text_features
    monkeypatch.setattr(kd.teacher, "text_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    kd.backend = "torch"
    for i in range(3):
        kd.compute_loss(images(2, i), None)
    kd.eval()
    with torch.no_grad():
        kd(images(2))
    assert len(calls) == 1
    kd.set_classnames(["horse", "zebra", "ship"])  # a new class list invalidates the cache
    with torch.no_grad():
        assert kd(images(2)).shape == (2, 3)
        kd(images(2))
    assert len(calls) == 2
    kd.backend = "reference"  # the official path re-encodes every call
    with torch.no_grad():
        kd(images(2))
        kd(images(2))
    assert len(calls) == 4


def test_batchnorm_running_stats_update_in_train_mode_only():
    kd = make_kd()
    bn = kd.projector[1]
    mean0, n0 = bn.running_mean.clone(), int(bn.num_batches_tracked)
    kd.eval()
    with torch.no_grad():
        kd(images(3))
    assert torch.equal(bn.running_mean, mean0) and int(bn.num_batches_tracked) == n0
    kd.train()
    assert bn.training and not kd.teacher.training and not kd.clip.training
    kd.compute_loss(images(3), None)
    assert not torch.equal(bn.running_mean, mean0) and int(bn.num_batches_tracked) == n0 + 1


def _trained(kd, steps=2):
    opt = torch.optim.SGD([p for p in kd.parameters() if p.requires_grad], lr=0.01)
    kd.train()
    for i in range(steps):
        loss, _ = kd.compute_loss(images(4, 10 + i), None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return kd.eval()


def test_save_load_round_trip(tmp_path):
    s_clip, t_clip = tiny_clip(), teacher_clip()
    kd = _trained(PromptKD(s_clip, NAMES, teacher=make_teacher(clip=t_clip), **S_KW))
    x = images(3)
    with torch.no_grad():
        want = kd(x)
    kd.save_pretrained(str(tmp_path / "kd"))
    sd = kd.trainable_state_dict()
    assert {"buffers.projector.1.running_mean", "buffers.projector.1.running_var",
            "buffers.projector.1.num_batches_tracked", "teacher.prompts.ctx"} <= set(sd)
    again = PromptKD.from_pretrained(str(tmp_path / "kd"), tiny_clip(), teacher_clip=teacher_clip()).eval()
    with torch.no_grad():
        assert rel_err(again(x), want) <= 1e-14
    assert torch.equal(again.projector[1].running_var, kd.projector[1].running_var)
    # the running statistics matter: with fresh BN buffers the eval logits differ
    fresh = PromptKD.from_pretrained(str(tmp_path / "kd"), tiny_clip(), teacher_clip=teacher_clip()).eval()
    fresh.projector[1].reset_running_stats()
    with torch.no_grad():
        assert rel_err(fresh(x), want) > 1e-3
    # a teacher on the student's own CLIP is rebuilt by the generic fastprompt.from_pretrained
    shared = _trained(PromptKD(s_clip, NAMES, teacher=make_teacher(clip=s_clip), **S_KW))
    assert shared.config.teacher_clip == "student"
    shared.save_pretrained(str(tmp_path / "shared"))
    loaded = fastprompt.from_pretrained(str(tmp_path / "shared"), clip_model=s_clip).eval()
    with torch.no_grad():
        assert rel_err(loaded(x), shared(x)) <= 1e-14


def test_teacher_from_a_saved_promptsrc_adapter(tmp_path):
    t_clip = teacher_clip()
    teacher = make_teacher(clip=t_clip)
    teacher.save_pretrained(str(tmp_path / "teacher"))
    kd = PromptKD(tiny_clip(), NAMES, teacher=str(tmp_path / "teacher"), teacher_clip=t_clip, **S_KW)
    assert torch.equal(kd.teacher.prompts.ctx, teacher.prompts.ctx)
    kd2 = PromptKD(tiny_clip(), NAMES, teacher_dir=str(tmp_path / "teacher"), teacher_clip=t_clip, **S_KW)
    with torch.no_grad():
        assert rel_err(kd2.teacher_text_features(), F.normalize(teacher.text_features(), dim=-1)) <= 1e-14


def test_base_to_new_uses_the_teachers_features_of_the_split():
    kd = _trained(make_kd(names=NAMES[:3]), steps=1)
    x = images(2)
    new = ["horse", "zebra", "ship", "golden retriever"]
    kd.set_classnames(new)
    other = make_teacher(names=new)  # an independently built teacher on the new classes, same tensors
    other.load_trainable_state_dict({n: p for n, p in kd.teacher.named_parameters() if not n.startswith("clip.")})
    with torch.no_grad():
        text = F.normalize(other.text_features(), dim=-1)
        want = kd.clip.logit_scale.exp() * F.normalize(kd.image_features(x), dim=-1) @ text.t()
        for backend in ("reference", "torch"):
            kd.backend = backend
            assert rel_err(kd(x), want) <= 1e-12


def test_errors():
    s = tiny_clip()
    with pytest.raises(ValueError, match="needs a teacher"):
        PromptKD(s, NAMES)
    with pytest.raises(TypeError, match="teacher"):
        PromptKD(s, NAMES, teacher=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="temperature"):
        PromptKD(s, NAMES, teacher=make_teacher(), temperature=0.0)
    with pytest.raises(ValueError, match="prompt_depth_vision"):
        PromptKD(s, NAMES, teacher=make_teacher(), prompt_depth_vision=5)
    with pytest.raises(TypeError, match="no option"):
        PromptKD(s, NAMES, teacher=make_teacher(), kd_wieght=1.0)
    with pytest.raises(ValueError, match="pass teacher_clip"):
        PromptKD(s, NAMES, teacher_config=dict(T_KW))
    kd = make_kd()
    with pytest.raises(ValueError, match="labels"):
        kd.compute_loss(images(2), torch.tensor([0, 1, 2]))


def test_teacher_text_cache_follows_the_teacher_prompts():
    """The fast path's cached teacher text is keyed on the teacher's prompt tensors: changing one in place (as
    loading a different teacher adapter does) re-encodes, and the result equals the reference's."""
    kd = make_kd()
    before = kd.teacher_text_features().clone()
    with torch.no_grad():  # a random (not uniform: LayerNorm would cancel a constant) change of the text context
        kd.teacher.prompts.ctx.add_(0.3 * torch.randn(kd.teacher.prompts.ctx.shape, dtype=torch.float64,
                                                      generator=torch.Generator().manual_seed(1)))
    after = kd.teacher_text_features()
    assert rel_err(after, before) > 1e-3
    kd.backend = "reference"
    assert rel_err(after, kd.teacher_text_features()) <= 1e-10
