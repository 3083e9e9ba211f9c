"""SoftCPT: fast == official reference for every variant (loss, logits, gradients of every trainable tensor),
the multi-task loss, present-task-only encoding, parameter count on ViT-B/16, save/load, errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastprompt
from fastprompt.learners.softcpt import VARIANTS
from tests.conftest import rel_err, tiny_clip

TOL = 1e-10
TASKS = ["pet breed recognition", "car model recognition", "texture", "food"]
CLASSES = [["dog", "cat", "golden retriever"], ["Lamborghini Gallardo LP 570-4 Superleggera 2012", "audi a4"],
           ["striped", "dotted", "bumpy", "woven"], ["pizza", "sushi"]]


def images(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def learner(variant, model=None, **kw):
    model = model if model is not None else tiny_clip()
    kw = {"n_ctx": 3, "task_n_ctx": 2, "class_n_ctx": 2, "seed": 0, **kw}
    return fastprompt.create_learner("softcpt", model, CLASSES, tasknames=TASKS, variant=variant, **kw)


def loss_and_grads(sc, backend, x, labels, tasks):
    sc.backend = backend
    if sc.sample_generator is not None:
        sc.sample_generator.manual_seed(5)
    params = [p for p in sc.parameters() if p.requires_grad]
    loss, logits = sc.compute_loss(x, labels, tasks)
    return loss.detach(), logits.detach(), torch.autograd.grad(loss, params)


# Task 3 ("food") is absent from the batch: the fast path must not need it.
LABELS, TASK_IDS = torch.tensor([0, 1, 2, 0, 3]), torch.tensor([0, 1, 2, 0, 2])


# Class sampling exists for the CA/CS variants only (the official code asserts it).
CASES = [(v, 0.0) for v in VARIANTS] + [(v, 0.5) for v in VARIANTS if not v.startswith("NA")]


@pytest.mark.parametrize("variant,rate", CASES, ids=[f"{v}-{'sampled' if r else 'all'}" for v, r in CASES])
def test_fast_equals_reference(variant, rate):
    sc = learner(variant, cls_sample_rate=rate)
    x = images(5)
    ref = loss_and_grads(sc, "reference", x, LABELS, TASK_IDS)
    fast = loss_and_grads(sc, "torch", x, LABELS, TASK_IDS)
    assert rel_err(fast[0], ref[0]) <= TOL
    finite = torch.isfinite(ref[1])
    assert torch.equal(finite, torch.isfinite(fast[1]))
    assert rel_err(fast[1][finite], ref[1][finite]) <= TOL
    assert len(ref[2]) == len(fast[2]) >= 2
    for g, r in zip(fast[2], ref[2]):
        assert r.abs().sum() > 0 and rel_err(g, r) <= TOL, rel_err(g, r)
    # eval logits of every task (cached text features)
    sc.eval()
    with torch.no_grad():
        sc.backend = "reference"
        full_ref = sc(x[:2])
        sc.backend = "torch"
        full_fast = sc(x[:2])
    assert full_ref.shape == (2, 11) and rel_err(full_fast, full_ref) <= TOL


def test_loss_is_per_task_ce_sum_over_batch():
    sc = learner("NATS")
    x = images(5)
    loss, masked = sc.compute_loss(x, LABELS, TASK_IDS)
    full = sc(x)  # [B, sum C], no dropout: the same logits
    offsets = [0, 3, 5, 9, 11]
    expected = 0.0
    for b in range(5):
        t = int(TASK_IDS[b])
        expected = expected + F.cross_entropy(full[b : b + 1, offsets[t] : offsets[t + 1]], LABELS[b : b + 1], reduction="sum")
    assert rel_err(loss, expected / 5) <= 1e-12
    # the returned logits: own task's columns, -inf elsewhere; argmax is the per-task prediction
    assert torch.isinf(masked[0, 3:]).all() and torch.isfinite(masked[0, :3]).all()
    assert rel_err(masked[2, 5:9], full[2, 5:9]) <= 1e-12
    # global labels give the same loss
    glob = torch.tensor([0, 4, 7, 0, 8])
    assert rel_err(sc.compute_loss(x, glob)[0], loss) <= 1e-12


def test_only_present_tasks_are_encoded(monkeypatch):
    sc = learner("NATA")
    sc.backend = "torch"
    calls = []
    real = sc.text.fast_features
    monkeypatch.setattr(sc.text, "fast_features", lambda ctx, shift, g, c, **k: calls.append((ctx.shape[0], c.tolist())) or real(ctx, shift, g, c, **k))
    sc.compute_loss(images(2), torch.tensor([1, 0]), torch.tensor([0, 3]))
    assert calls == [(2, [0, 1, 2, 9, 10])]  # 2 task contexts (tasks 0 and 3), their 5 classes only


def test_class_sampling_selection():
    sc = learner("CSTA", cls_sample_rate=0.5)
    sel = sc.select_classes(torch.tensor([1, 7, 6]))  # task 0 class 1; task 2 classes 2 and 1
    sizes = [3, 2, 4, 2]
    assert [len(s) for s in sel] == [1 + 1, 0 + 1, 2 + 1, 0 + 1]  # present + ceil(0.5 * others)
    assert sel[0][0] == 1 and sel[2][:2].tolist() == [1, 2]
    assert all(len(set(s.tolist())) == len(s) and max(s.tolist()) < n for s, n in zip(sel, sizes))


def test_parameter_count_vitb16():
    model, _, tok = fastprompt.load_clip("ViT-B-16", pretrained=None)
    tasks, classes = ["pets", "cars", "food"], [["dog", "cat"], ["audi"], ["pizza", "sushi"]]
    nata = fastprompt.create_learner("softcpt", model, classes, tasknames=tasks, tokenizer=tok)
    assert nata.num_trainable_parameters() == 512 * 16 * 512 + 4 * 512  # W [512, 16*512] + U [4, 512]
    nats = fastprompt.create_learner("softcpt", model, classes, tasknames=tasks, variant="NATS", tokenizer=tok)
    assert nats.num_trainable_parameters() == 512 * 16 * 512 + 3 * 4 * 512
    cata = fastprompt.create_learner("softcpt", model, classes, tasknames=tasks, variant="CATA", tokenizer=tok)
    assert cata.num_trainable_parameters() == 1024 * 16 * 512 + 4 * 512 + 4 * 512
    assert nata.proj.dtype == torch.float32


def test_save_and_load(tmp_path):
    model = tiny_clip()
    sc = learner("CSTS", model)
    sc.save_pretrained(str(tmp_path))
    again = fastprompt.from_pretrained(str(tmp_path), clip_model=model)
    x = images(2)
    assert again.tasknames == sc.tasknames and again.classnames == sc.classnames
    assert torch.equal(again(x), sc(x))


def test_zero_task_context_is_constant():
    sc = learner("NATA", task_n_ctx=0)
    assert [n for n, p in sc.named_parameters() if p.requires_grad] == ["proj"]
    ref = loss_and_grads(sc, "reference", images(2), torch.tensor([0, 1]), torch.tensor([0, 2]))
    fast = loss_and_grads(sc, "torch", images(2), torch.tensor([0, 1]), torch.tensor([0, 2]))
    assert rel_err(fast[0], ref[0]) <= TOL and rel_err(fast[2][0], ref[2][0]) <= TOL


def test_errors():
    model = tiny_clip()
    with pytest.raises(ValueError, match="variant"):
        learner("NAXX", model)
    with pytest.raises(ValueError, match="class sampling needs"):
        learner("NATA", model, cls_sample_rate=0.1)
    with pytest.raises(ValueError, match="tasknames has 1 names"):
        fastprompt.create_learner("softcpt", model, CLASSES, tasknames=["x"])
    with pytest.raises(TypeError, match="one list of class names per task"):
        fastprompt.create_learner("softcpt", model, "dog", tasknames=["x"])
    sc = learner("NATA", model)
    with pytest.raises(ValueError, match="exceed"):
        sc.compute_loss(images(1), torch.tensor([3]), torch.tensor([0]))
    with pytest.raises(ValueError, match="task ids"):
        sc.compute_loss(images(1), torch.tensor([0]), torch.tensor([4]))
    with pytest.raises(ValueError, match="global labels"):
        sc.compute_loss(images(1), torch.tensor([11]))
