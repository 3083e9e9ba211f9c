"""DPC over PromptKD (the released ``sple_promptkd.py``): fast == official reference (DHNO loss, [B', B']
logits, the gradient of every trainable tensor incl. the projector, BatchNorm statistics), the official vs paper
initialisation, the base / new evaluation heads, the teacher as the sampler, state round trips.

Student: ``tests.conftest.tiny_clip`` (embed 48); teacher: a PromptSRC on a wider tiny CLIP (embed 40), as in
``tests/learners/test_promptkd.py``."""
from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F

from fastprompt.learners._hard_negatives import mine_hard_negatives
from fastprompt.learners.dpc import DPC
from tests.conftest import rel_err
from tests.learners.test_promptkd import NAMES, images, make_kd

TOL = 1e-10
CTX = "teacher.prompts.ctx"


def library(n_cls, per_class=2):
    return {c: images(per_class, seed=100 + c) for c in range(n_cls)}


def trained_kd():
    kd = make_kd()
    with torch.no_grad():  # a "trained" student and non-trivial head BN statistics
        for p in kd.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        kd.projector[1].running_mean.add_(0.1)
        kd.projector[1].running_var.mul_(1.5)
    return kd


def make_dpc(mode="official", **kw):
    dpc = DPC.from_tuned(trained_kd(), mode=mode, top_k=2, seed=0, **{"base_weight": 0.4, "new_weight": 0.3, **kw})
    dpc.set_library(library(len(NAMES)))
    with torch.no_grad():  # P' off P
        for p in getattr(dpc, dpc.store_name).values():
            p.add_(0.03 * torch.randn_like(p))
    return dpc


def all_buffers(dpc):
    return {n: b for n, b in dpc.named_buffers() if "projector" in n or "bn_stats" in n}


def trainable(dpc):
    return [(n, p) for n, p in dpc.named_parameters() if p.requires_grad]


def test_trainable_tensors_are_the_dpc_prompts():
    dpc = make_dpc()
    names = [n for n, _ in trainable(dpc)]
    assert sorted(names) == sorted(["mixed." + k for k in ["vpt", "vpt_deep__0", "projector__0__weight", "projector__0__bias",
                                            "projector__1__weight", "projector__1__bias", "projector__3__weight",
                                            "projector__3__bias", "teacher__prompts__ctx",
                                            "teacher__prompts__text_deep__0"]])
    assert dpc.demix_names == [CTX] and dpc.config.fallback == "promptkd"
    assert not any(p.requires_grad for p in dpc.backbone.parameters())


def _step(dpc, backend, x, y, state):
    for n, b in all_buffers(dpc).items():  # identical BN statistics for both paths
        b.copy_(state[n])
    dpc.backend = backend
    dpc.rng.seed(0)
    batch = dpc.build_batch(x, y)
    loss, logits = dpc.contrastive_loss(batch)
    grads = torch.autograd.grad(loss, [p for _, p in trainable(dpc)])
    after = {n: b.clone() for n, b in all_buffers(dpc).items()}
    return batch, loss.detach(), logits.detach(), grads, after


@pytest.mark.parametrize("mode", ["official", "paper"])
def test_fast_equals_reference(mode):
    dpc = make_dpc(mode).train()
    x, y = images(3), torch.tensor([0, 4, 4])
    state = {n: b.clone() for n, b in all_buffers(dpc).items()}
    rb, rl, rlog, rg, rbuf = _step(dpc, "reference", x, y, state)
    fb, fl, flog, fg, fbuf = _step(dpc, "torch", x, y, state)
    assert fb.negatives == rb.negatives and torch.equal(fb.labels, rb.labels) and torch.equal(fb.images, rb.images)
    assert rel_err(fl, rl) <= TOL and rel_err(flog, rlog) <= TOL
    scale = max(r.norm() for r in rg)
    for (name, _), g, r in zip(trainable(dpc), fg, rg):
        if name == "mixed.projector__0__bias" or name == "parallel.projector__0__bias":
            # train-mode BN subtracts the batch mean: exactly zero gradient, rounding noise on both paths
            assert g.norm() <= 1e-10 * scale and r.norm() <= 1e-10 * scale
            continue
        assert r.abs().sum() > 0 and rel_err(g, r) <= TOL, (name, rel_err(g, r))
    # the DPC projector's statistics moved (train mode), identically; the head's were not touched by the loss
    key = "bn_stats.projector__1__running_mean"
    assert not torch.equal(rbuf[key], state[key]) and rel_err(fbuf[key], rbuf[key]) <= TOL
    assert torch.equal(rbuf["backbone.projector.1.running_mean"], state["backbone.projector.1.running_mean"])
    # evaluation logits of both splits (and their gradients)
    dpc.eval()
    for split in ("base", "new"):
        dpc.split = split
        outs = {}
        for backend in ("reference", "torch"):
            dpc.backend = backend
            out = dpc(x[:2])
            w = torch.arange(out.numel(), dtype=out.dtype).view_as(out)
            outs[backend] = (out.detach(), torch.autograd.grad((out * w).sum(), [p for _, p in trainable(dpc)],
                                                               allow_unused=True))
        assert rel_err(outs["torch"][0], outs["reference"][0]) <= TOL, split
        for g, r in zip(outs["torch"][1], outs["reference"][1]):
            assert (g is None and r is None) or rel_err(g, r) <= TOL


def test_fast_path_encodes_only_the_needed_classes(monkeypatch):
    dpc = make_dpc().train()
    dpc.backend = "torch"
    batch = dpc.build_batch(images(2), torch.tensor([1, 3]))
    needed = sorted(set(batch.labels.tolist()))
    assert len(needed) < len(NAMES)
    seen = []
    real = dpc.backbone.teacher.text.fast_features
    monkeypatch.setattr(dpc.backbone.teacher.text, "fast_features",
                        lambda *a, **k: seen.append(a[3].tolist()) or real(*a, **k))
    dpc.contrastive_loss(batch)
    assert seen == [needed]


def test_official_and_paper_initialisation():
    kd = trained_kd()
    P = {n: p.detach() for n, p in kd.named_parameters()}
    off = DPC.from_tuned(kd, mode="official", top_k=2, seed=5)
    pap = DPC.from_tuned(kd, mode="paper", top_k=2, seed=5)
    fresh = ["vpt_deep.0", "teacher.prompts.text_deep.0"]
    for n in off.prompt_names:
        stored_off, stored_pap = off.mixed[n.replace(".", "__")], pap.parallel[n.replace(".", "__")]
        assert torch.equal(stored_pap, P[n]), n  # paper: everything cloned
        if n in fresh:
            assert not torch.equal(stored_off, P[n]), n
        else:  # layer-0 text ctx, layer-0 vpt and the projector start from the backbone
            assert torch.equal(stored_off, P[n]), n
    # the fresh ones are N(0, 0.02^2) from a generator seeded with ``seed``, in prompt order
    g = torch.Generator().manual_seed(5)
    for n in fresh:
        want = torch.empty(P[n].shape, dtype=P[n].dtype).normal_(0.0, 0.02, generator=g)
        assert torch.equal(off.mixed[n.replace(".", "__")], want), n
    # both DPC models start with the head's BN statistics
    assert torch.equal(off.bn_buffers()["projector.1.running_var"], kd.projector[1].running_var)
    with pytest.raises(ValueError, match="official' or 'paper"):
        DPC.from_tuned(kd, mode="simple", top_k=2)


def test_official_demixes_the_text_ctx_only():
    dpc = make_dpc("official", base_weight=0.25)
    P, store, Pp = dpc.tuned_prompts(), dpc.mixed, dpc.parallel_prompts()
    assert rel_err(Pp[CTX], (store["teacher__prompts__ctx"] - 0.75 * P[CTX]) / 0.25) <= 1e-14
    for n in dpc.prompt_names:
        if n != CTX:
            assert Pp[n] is store[n.replace(".", "__")], n
    assert all(dpc.inference_prompts("base")[n] is Pp[n] for n in dpc.prompt_names if n != CTX)


def _head_copy(dpc, tensors, buffers):
    """The backbone PromptKD with ``tensors`` / ``buffers`` written into it (a plain copy, no DPC)."""
    head = copy.deepcopy(dpc.backbone)
    named, bufs = dict(head.named_parameters()), dict(head.named_buffers())
    with torch.no_grad():
        for n, v in tensors.items():
            named[n].copy_(v)
        for n, v in buffers.items():
            bufs[n].copy_(v)
    return head.eval()


@pytest.mark.parametrize("mode", ["official", "paper"])
def test_base_and_new_evaluation_heads(mode):
    dpc = make_dpc(mode)
    dpc.train()
    # a training step moves the DPC model's BN statistics off the head's
    dpc.contrastive_loss(dpc.build_batch(images(3), torch.tensor([0, 1, 2])))
    dpc.eval()
    x = images(2, seed=9)
    with torch.no_grad():
        # base: logit_scale * (student(P') + DPC projector) . (teacher text tower with P')^T
        base = dpc.inference_prompts("base")
        head = _head_copy(dpc, base, dpc.bn_buffers())
        img = F.normalize(head.image_features(x), dim=-1)
        text = F.normalize(head.teacher.text_features(), dim=-1)
        want = dpc.clip.logit_scale.exp() * img @ text.t()
        for backend in ("reference", "torch"):
            dpc.backend = backend
            assert rel_err(dpc(x), want) <= 1e-12, backend
        # new: the w_n-mixed student (head BN statistics) against the teacher's frozen text features
        new_names = ["horse", "zebra", "ship"]
        dpc.set_classnames(new_names)
        assert dpc.split == "new"
        P, store, wn = dpc.tuned_prompts(), getattr(dpc, dpc.store_name), 0.3
        mixed = {n: wn * store[n.replace(".", "__")] + (1 - wn) * P[n] for n in dpc.prompt_names
                 if not n.startswith("teacher.")}
        head = _head_copy(dpc, mixed, {})
        head.set_classnames(new_names)
        want = dpc.clip.logit_scale.exp() * F.normalize(head.image_features(x), dim=-1) @ \
            F.normalize(head.teacher.text_features(), dim=-1).t()
        for backend in ("reference", "torch"):
            dpc.backend = backend
            assert rel_err(dpc(x), want) <= 1e-12, backend


def test_new_weight_zero_is_the_promptkd_student():
    dpc = make_dpc("official", new_weight=0.0)
    kd = dpc.backbone
    dpc.eval()
    dpc.set_classnames(["horse", "zebra"])
    x = images(2)
    with torch.no_grad():
        assert rel_err(dpc(x), kd(x)) <= 1e-13


def test_the_teacher_scores_the_batch(monkeypatch):
    dpc = make_dpc().train()
    teacher = dpc.backbone.teacher
    calls = []
    real = teacher.image_features
    monkeypatch.setattr(teacher, "image_features", lambda imgs: calls.append(imgs.shape[0]) or real(imgs))
    x, y = images(3), torch.tensor([0, 1, 4])
    dpc.rng.seed(0)
    batch = dpc.build_batch(x, y)
    assert calls == [3]  # the sampler ran the teacher's image tower on the B originals only
    with torch.no_grad():
        feats = F.normalize(real(x), dim=-1)
        text = F.normalize(teacher.text_features(), dim=-1)
    assert rel_err(batch.orig_features, feats) <= 1e-12
    # the negatives are the miner's on the teacher's scores (same random stream, image draws interleaved)
    rng = random.Random(0)
    lib = dpc.library
    want = mine_hard_negatives((100 * feats @ text.t()).softmax(-1), y, 2, rng, "promptkd",
                               after_sample=lambda i, negs: lib.sample(negs, rng))
    assert batch.negatives == want


def test_state_round_trip_and_from_saved_promptkd(tmp_path):
    kd = trained_kd()
    kd.save_pretrained(str(tmp_path / "kd"))
    dpc = DPC.from_tuned(kd, mode="official", top_k=2, seed=0, base_weight=0.4, new_weight=0.3)
    dpc.set_library(library(len(NAMES)))
    with torch.no_grad():
        for p in dpc.mixed.values():
            p.add_(0.03 * torch.randn_like(p))
    dpc.train()
    dpc.contrastive_loss(dpc.build_batch(images(3), torch.tensor([0, 1, 2])))
    dpc.eval()
    sd = dpc.trainable_state_dict()
    assert {"head.teacher.prompts.vpt", "head.buffers.projector.1.running_var",
            "buffers.projector.1.running_var", "tuned.vpt", "tuned." + CTX} <= set(sd)
    # a stage-2 learner from the saved PromptKD adapter (teacher CLIP passed in), then the DPC state loaded
    again = DPC.from_tuned(str(tmp_path / "kd"), clip_model=kd.clip, teacher_clip=kd.teacher.clip,
                           mode="official", top_k=2, base_weight=0.4, new_weight=0.3)
    for n, p in dpc.tuned_prompts().items():
        assert torch.equal(again.tuned_prompts()[n], p), n
    again.load_trainable_state_dict(sd)
    again.eval()
    x = images(2)
    with torch.no_grad():
        assert rel_err(again(x), dpc(x)) <= 1e-14
        again.set_classnames(["horse", "zebra"])
        dpc.set_classnames(["horse", "zebra"])
        assert rel_err(again(x), dpc(x)) <= 1e-14
    bad = dict(sd)
    bad.pop("buffers.projector.1.running_var")
    with pytest.raises(ValueError, match="buffers"):
        again.load_trainable_state_dict(bad)


def test_save_pretrained_and_generic_from_pretrained(tmp_path):
    """With the teacher on the student's own CLIP (recorded as "student"), a saved DPC-over-PromptKD comes back
    through the generic ``fastprompt.from_pretrained`` (backbone, teacher and all tensors rebuilt) and gives the
    same base and new logits."""
    import fastprompt
    from tests.conftest import tiny_clip

    clip = tiny_clip()
    teacher = fastprompt.create_learner("promptsrc", clip, NAMES, n_ctx_text=2, n_ctx_vision=2,
                                        prompt_depth_text=2, prompt_depth_vision=2)
    kd = fastprompt.create_learner("promptkd", clip, NAMES, teacher=teacher, prompt_depth_vision=2)
    assert kd.config.teacher_clip == "student"
    dpc = DPC.from_tuned(kd, top_k=2, seed=0, base_weight=0.4, new_weight=0.3)
    with torch.no_grad():
        for p in dpc.mixed.values():
            p.add_(0.03 * torch.randn_like(p))
    dpc.save_pretrained(str(tmp_path / "dpc"))
    back = fastprompt.from_pretrained(str(tmp_path / "dpc"), clip_model=clip)
    dpc.eval(), back.eval()
    x = images(2)
    with torch.no_grad():
        assert rel_err(back(x), dpc(x)) <= 1e-14
        back.set_classnames(["horse", "zebra"]), dpc.set_classnames(["horse", "zebra"])
        assert rel_err(back(x), dpc(x)) <= 1e-14
