"""DPC: fast == official reference (DHNO loss, logits, gradients of P'), weighting-decoupling modes, the
two-stage workflow, and the image library from a dataset."""
from __future__ import annotations

import pytest
import torch

import fastprompt
from fastprompt.datasets.base import DatasetSplits, Datum
from fastprompt.learners.dpc import DPC
from fastprompt.learners.registry import list_learners
from tests.conftest import rel_err, tiny_clip

TOL = 1e-10
NAMES = ["dog", "Lamborghini Gallardo LP 570-4 Superleggera 2012", "cat", "golden retriever", "a_b_c", "plane", "ship"]


def images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64)


def library(n_cls, per_class=2):
    return {c: images(per_class, seed=100 + c) for c in range(n_cls)}


def perturb(dpc, scale=0.05):
    """Move P' away from P (a trained state), so that every mode and split differs."""
    with torch.no_grad():
        for p in getattr(dpc, dpc.store_name).values():
            p.add_(scale * torch.randn_like(p))


def run(dpc, backend, imgs, labels, seed=0):
    params = [p for p in dpc.parameters() if p.requires_grad]
    dpc.backend = backend
    dpc.rng.seed(seed)
    batch = dpc.build_batch(imgs, labels)
    loss, logits = dpc.contrastive_loss(batch)
    grads = torch.autograd.grad(loss, params)
    return batch, loss.detach(), logits.detach(), grads


def assert_dpc_equivalent(dpc, imgs, labels):
    ref_batch, ref_loss, ref_logits, ref_grads = run(dpc, "reference", imgs, labels)
    batch, loss, logits, grads = run(dpc, "torch", imgs, labels)
    assert batch.negatives == ref_batch.negatives and torch.equal(batch.labels, ref_batch.labels)
    assert torch.equal(batch.images, ref_batch.images)
    assert rel_err(loss, ref_loss) <= TOL and rel_err(logits, ref_logits) <= TOL
    for g, r in zip(grads, ref_grads):
        assert r.abs().sum() > 0 and rel_err(g, r) <= TOL, rel_err(g, r)
    # classification logits of the current split (and their gradients)
    outs = {}
    for backend in ("reference", "torch"):
        dpc.backend = backend
        out = dpc(imgs[:2])
        outs[backend] = (out.detach(), torch.autograd.grad((out * torch.arange(out.numel()).view_as(out)).sum(),
                                                            [p for p in dpc.parameters() if p.requires_grad]))
    assert rel_err(outs["torch"][0], outs["reference"][0]) <= TOL
    for g, r in zip(outs["torch"][1], outs["reference"][1]):
        assert rel_err(g, r) <= TOL


@pytest.mark.parametrize("mode", ["official", "paper"])
@pytest.mark.parametrize("coop_kwargs", [{"n_ctx": 4}, {"n_ctx": 3, "csc": True}, {"n_ctx": 5, "class_token_position": "middle"}],
                         ids=["unified", "csc", "middle"])
def test_dpc_coop_fast_equals_reference(mode, coop_kwargs):
    model = tiny_clip(custom_text=coop_kwargs.get("csc", False))
    backbone = fastprompt.create_learner("coop", model, NAMES, **coop_kwargs)
    dpc = DPC.from_tuned(backbone, mode=mode, top_k=3, base_weight=0.3, new_weight=0.4, seed=0)
    dpc.set_library(library(len(NAMES)))
    perturb(dpc)
    assert_dpc_equivalent(dpc, images(4), torch.tensor([0, 2, 2, 5]))


def test_dpc_fast_path_encodes_only_the_needed_classes(monkeypatch):
    model = tiny_clip()
    dpc = DPC.from_tuned(fastprompt.create_learner("coop", model, NAMES, n_ctx=2), top_k=2, seed=0)
    dpc.set_library(library(len(NAMES)))
    dpc.backend = "torch"
    dpc.rng.seed(0)
    batch = dpc.build_batch(images(2), torch.tensor([1, 3]))
    seen = []
    real = dpc.backbone.text.fast_features
    monkeypatch.setattr(dpc.backbone.text, "fast_features", lambda *a, **k: seen.append(a[3].tolist()) or real(*a, **k))
    dpc.contrastive_loss(batch)
    assert seen == [sorted(set(batch.labels.tolist()))]


BACKBONES = [name for name in ("maple", "promptsrc", "ivlp") if name in list_learners()]


@pytest.mark.parametrize("name", BACKBONES)
def test_dpc_other_backbones_fast_equals_reference(name):
    model = tiny_clip()
    deep = {"prompt_depth_text": 2, "prompt_depth_vision": 2}
    kwargs = {"maple": {"prompt_depth": 2}, "promptsrc": deep, "ivlp": deep}[name]
    backbone = fastprompt.create_learner(name, model, NAMES[:5], **kwargs)
    dpc = DPC.from_tuned(backbone, top_k=2, seed=0)
    assert dpc.hooks.image_uses_prompts
    dpc.set_library(library(5))
    perturb(dpc, 0.02)
    ref_batch, ref_loss, ref_logits, ref_grads = run(dpc, "reference", images(3), torch.tensor([0, 1, 4]))
    batch, loss, logits, grads = run(dpc, "torch", images(3), torch.tensor([0, 1, 4]))
    assert batch.negatives == ref_batch.negatives
    assert rel_err(loss, ref_loss) <= TOL and rel_err(logits, ref_logits) <= TOL
    nonzero = 0
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= TOL or r.abs().sum() == g.abs().sum() == 0
        nonzero += int(r.abs().sum() > 0)
    assert nonzero >= 2  # text and image prompts both receive gradient


# ---------------------------------------------------------------------- weighting-decoupling
def _pair(mode, wb=0.25, wn=0.3):
    model = tiny_clip()
    torch.manual_seed(7)
    backbone = fastprompt.create_learner("coop", model, NAMES[:5], n_ctx=3)
    return backbone, DPC.from_tuned(backbone, mode=mode, base_weight=wb, new_weight=wn, top_k=2, seed=0)


def test_modes_use_the_specified_prompts():
    backbone, off = _pair("official")
    _, pap = _pair("paper")
    P = backbone.ctx.detach()
    target = P + 0.1 * torch.randn_like(P)  # the same P' in both learners
    with torch.no_grad():
        off.mixed["ctx"].copy_(0.25 * target + 0.75 * P)  # official stores M = w_b P' + (1 - w_b) P
        pap.parallel["ctx"].copy_(target)
    for dpc in (off, pap):
        assert rel_err(dpc.parallel_prompts()["ctx"], target) <= 1e-14
        assert rel_err(dpc.inference_prompts("new")["ctx"], 0.3 * target + 0.7 * P) <= 1e-14
    assert rel_err(off.inference_prompts("base")["ctx"], target) <= 1e-14  # released code: base uses P'
    assert rel_err(pap.inference_prompts("base")["ctx"], 0.25 * target + 0.75 * P) <= 1e-14  # paper: the mix
    # ... and the logits are CoOp's with exactly that context
    x = images(2)
    ref = fastprompt.create_learner("coop", backbone.clip, NAMES[:5], n_ctx=3)
    for dpc, ctx in ((off, target), (pap, 0.25 * target + 0.75 * P)):
        with torch.no_grad():
            ref.ctx.copy_(ctx)
        assert rel_err(dpc(x), ref(x)) <= 1e-12
    # new classes: w_n P' + (1 - w_n) P in both modes
    off.set_classnames(["horse", "zebra"])
    pap.set_classnames(["horse", "zebra"])
    assert off.split == pap.split == "new"
    assert rel_err(off(x), pap(x)) <= 1e-12


def test_simple_and_void_modes_use_the_specified_prompts():
    """STACK.MODE simple: M is trained and used as it is (base), new classes de-mix M and mix with w_n.
    void: a freshly initialised V (the backbone's own init, not P) used as it is; new classes mix it with P."""
    wb, wn = 0.25, 0.3
    backbone, sim = _pair("simple", wb, wn)
    P = backbone.ctx.detach()
    assert sim.store_name == "mixed" and torch.equal(sim.mixed["ctx"], P)  # SPLE_INIT: M starts at P
    M = P + 0.1 * torch.randn_like(P)
    with torch.no_grad():
        sim.mixed["ctx"].copy_(M)
    assert torch.equal(sim.parallel_prompts()["ctx"], sim.mixed["ctx"])  # the forward uses M directly
    assert rel_err(sim.inference_prompts("base")["ctx"], M) <= 1e-14
    assert rel_err(sim.inference_prompts("new")["ctx"], wn * (M - (1 - wb) * P) / wb + (1 - wn) * P) <= 1e-14
    # void: V starts from a fresh CoOp init (the same RNG draw as a new CoOp), not from P
    torch.manual_seed(11)
    model = tiny_clip()
    torch.manual_seed(7)
    backbone = fastprompt.create_learner("coop", model, NAMES[:5], n_ctx=3)
    torch.manual_seed(3)
    void = DPC(model, NAMES[:5], backbone_learner=backbone, mode="void", base_weight=wb, new_weight=wn, top_k=2, seed=0)
    torch.manual_seed(3)
    fresh = fastprompt.create_learner("coop", model, NAMES[:5], n_ctx=3)  # the same draw as void's init
    P = backbone.ctx.detach()
    V = void.parallel["ctx"]
    assert void.store_name == "parallel" and not torch.equal(V, P)
    assert torch.equal(V.detach(), fresh.ctx.detach())
    assert torch.equal(void.parallel_prompts()["ctx"], V)
    assert torch.equal(void.inference_prompts("base")["ctx"], V)
    assert rel_err(void.inference_prompts("new")["ctx"], wn * V + (1 - wn) * P) <= 1e-14
    # logits are CoOp's with exactly those contexts
    x = images(2)
    ref = fastprompt.create_learner("coop", backbone.clip, NAMES[:5], n_ctx=3)
    for dpc, ctx in ((sim, M), (void, V)):
        with torch.no_grad():
            ref.ctx.copy_(ctx)
        assert rel_err(dpc(x), ref(x)) <= 1e-12


@pytest.mark.parametrize("mode", ["simple", "void"])
def test_simple_void_fast_equals_reference(mode):
    backbone = fastprompt.create_learner("coop", tiny_clip(), NAMES, n_ctx=3)
    dpc = DPC.from_tuned(backbone, mode=mode, top_k=3, base_weight=0.3, new_weight=0.4, seed=0)
    dpc.set_library(library(len(NAMES)))
    perturb(dpc)
    assert_dpc_equivalent(dpc, images(4), torch.tensor([0, 2, 2, 5]))
    # the DHNO gradient reaches the trained tensor unscaled (no de-mix in the forward)
    batch = dpc.build_batch(images(2), torch.tensor([1, 3]))
    loss, _ = dpc.contrastive_loss(batch)
    store = getattr(dpc, dpc.store_name)["ctx"]
    (g,) = torch.autograd.grad(loss, [store])
    dpc2 = DPC.from_tuned(backbone, mode="paper", top_k=3, seed=0)
    with torch.no_grad():
        dpc2.parallel["ctx"].copy_(store)
    dpc2.set_library(library(len(NAMES)))
    dpc2.backend = dpc.backend
    (g2,) = torch.autograd.grad(dpc2.contrastive_loss(batch)[0], [dpc2.parallel["ctx"]])
    assert rel_err(g, g2) <= TOL


def test_official_mode_is_sgd_on_the_mixed_tensor():
    """The gradient w.r.t. M is (1/w_b) grad_P', and one SGD step with weight decay moves P' by
    -(lr / w_b^2) grad_P' - (lr * wd / w_b) M (the lr scaling and the decay on M of the released code)."""
    wb, lr, wd = 0.25, 0.01, 5e-4
    _, off = _pair("official", wb=wb)
    _, pap = _pair("paper", wb=wb)
    off.set_library(library(5))
    pap.set_library(library(5))
    for dpc in (off, pap):
        dpc.backend = "torch"
    x, y = images(3), torch.tensor([0, 1, 3])
    perturb(off, 0.05)
    with torch.no_grad():
        pap.parallel["ctx"].copy_(off.parallel_prompts()["ctx"])
    off.rng.seed(1)
    pap.rng.seed(1)
    loss_off, _ = off.compute_loss(x, y)
    loss_pap, _ = pap.compute_loss(x, y)
    assert rel_err(loss_off, loss_pap) <= 1e-12
    g_m, = torch.autograd.grad(loss_off, [off.mixed["ctx"]])
    g_p, = torch.autograd.grad(loss_pap, [pap.parallel["ctx"]])
    assert rel_err(g_m, g_p / wb) <= 1e-12
    M0, Pp0 = off.mixed["ctx"].detach().clone(), off.parallel_prompts()["ctx"].detach().clone()
    opt = torch.optim.SGD(off.param_groups(lr), lr=lr, momentum=0.9, weight_decay=wd)
    off.mixed["ctx"].grad = g_m
    opt.step()
    moved = off.parallel_prompts()["ctx"].detach() - Pp0
    assert rel_err(moved, -(lr / wb**2) * g_p - (lr * wd / wb) * M0) <= 1e-10


def test_new_weight_zero_is_the_backbone():
    backbone, pap = _pair("paper", wn=0.0)
    perturb(pap)
    pap.set_classnames(["horse", "zebra", "cow"])
    backbone.set_classnames(["horse", "zebra", "cow"])
    x = images(2)
    assert torch.equal(pap(x), backbone(x))


# ---------------------------------------------------------------------- workflow and errors
def test_two_stage_workflow(tmp_path):
    model = tiny_clip()
    coop = fastprompt.create_learner("coop", model, NAMES[:4], n_ctx=2)
    coop.save_pretrained(str(tmp_path / "coop"))
    dpc = DPC.from_tuned(str(tmp_path / "coop"), clip_model=model, top_k=2, seed=0)
    assert torch.equal(dpc.tuned_prompts()["ctx"], coop.ctx.detach())
    assert torch.equal(dpc.parallel_prompts()["ctx"], coop.ctx.detach())  # M = P; w_b = 0.5 de-mixes exactly
    assert [n for n, p in dpc.named_parameters() if p.requires_grad] == ["mixed.ctx"]
    dpc.set_library(library(4))
    opt = torch.optim.SGD(dpc.param_groups(0.1), lr=0.1)
    loss, _ = dpc.compute_loss(images(2), torch.tensor([0, 3]))
    loss.backward()
    opt.step()
    dpc.save_pretrained(str(tmp_path / "dpc"))
    again = fastprompt.from_pretrained(str(tmp_path / "dpc"), clip_model=model)
    assert isinstance(again, DPC) and again.config.backbone == "coop"
    assert torch.equal(again.tuned_prompts()["ctx"], coop.ctx.detach())
    assert torch.equal(again.mixed["ctx"], dpc.mixed["ctx"])
    x = images(2)
    assert torch.equal(again(x), dpc(x))
    # a learner as the source is copied, not modified
    dpc2 = DPC.from_tuned(coop, top_k=2)
    assert coop.ctx.requires_grad and dpc2.backbone is not coop


def test_errors():
    model = tiny_clip()
    coop = fastprompt.create_learner("coop", model, NAMES[:3], n_ctx=2)
    with pytest.raises(ValueError, match="top_k=8 is larger than the number of training classes"):
        DPC.from_tuned(coop)  # the default K=8 with 3 base classes (EuroSAT-like)
    with pytest.raises(ValueError, match="mode"):
        DPC.from_tuned(coop, top_k=2, mode="loop")
    with pytest.raises(ValueError, match="base_weight"):
        DPC.from_tuned(coop, top_k=2, base_weight=0.0)
    dpc = DPC.from_tuned(coop, top_k=2)
    with pytest.raises(RuntimeError, match="image library"):
        dpc.compute_loss(images(1), torch.tensor([0]))
    with pytest.raises(TypeError, match="no option"):
        fastprompt.create_learner("dpc", model, NAMES[:3], topk=2)


def test_attach_train_data_reads_files(tmp_path):
    from PIL import Image

    model = tiny_clip()
    train = []
    for c in range(4):
        for k in range(2):
            path = tmp_path / f"c{c}_{k}.png"
            Image.new("RGB", (40, 36), (30 * c, 10 * k, 0)).save(path)
            train.append(Datum(str(path), c))
    ds = DatasetSplits("toy", NAMES[:4], train_x=train)
    dpc = fastprompt.create_learner("dpc", model, NAMES[:4], backbone_config={"n_ctx": 2}, top_k=2, seed=0)
    dpc.attach_train_data(ds)  # default: Dassl's training transform at the model's 32 px
    assert dpc.library.labels == [0, 1, 2, 3] and len(dpc.library) == 8
    batch = dpc.build_batch(images(2), torch.tensor([0, 1]))
    assert batch.images.shape[1:] == (3, 32, 32) and batch.images.shape[0] == 2 + len(batch.neg_rows)
    assert sorted(batch.labels[batch.orig_rows].tolist()) == [0, 1]
    loss, logits = dpc.contrastive_loss(batch)
    assert torch.isfinite(loss) and logits.shape == (len(batch.labels),) * 2
    with pytest.raises(ValueError, match="classes"):
        dpc.attach_train_data(DatasetSplits("toy", NAMES[:3], train_x=train[:2]))
