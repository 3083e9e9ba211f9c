"""Fast path == official reference for CoOp and CoCoOp: logits and gradients of every trainable tensor."""
from __future__ import annotations

import pytest
import torch

import fastprompt
from fastprompt._extension import extension_loaded
from tests.conftest import images_for, rel_err, tiny_clip

FAST_BACKENDS = ["torch", "auto"] + (["compiled"] if extension_loaded() else [])
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def logits_and_grads(learner, images, upstream=None):
    params = [p for p in learner.parameters() if p.requires_grad]
    logits = learner(images)
    if upstream is None:
        upstream = torch.randn_like(logits)
    grads = torch.autograd.grad((logits * upstream).sum(), params)
    return logits.detach(), grads, upstream


def assert_equivalent(learner, images, backend, tol):
    learner.backend = "reference"
    ref_logits, ref_grads, upstream = logits_and_grads(learner, images)
    learner.backend = backend
    fast_logits, fast_grads, _ = logits_and_grads(learner, images, upstream)
    assert rel_err(fast_logits, ref_logits) <= tol, rel_err(fast_logits, ref_logits)
    assert len(fast_grads) == len(ref_grads) > 0
    for g_fast, g_ref in zip(fast_grads, ref_grads):
        assert g_ref.abs().sum() > 0, "reference gradient is zero: the test would prove nothing"
        assert rel_err(g_fast, g_ref) <= tol, rel_err(g_fast, g_ref)


NAMES = ["golden retriever", "Lamborghini Gallardo LP 570-4 Superleggera 2012", "a_b_c", "cat", "Mexican hairless dog (xoloitzcuintli)"]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("csc", [False, True], ids=["unified", "csc"])
@pytest.mark.parametrize("n_ctx", [1, 5, 16])
def test_coop_tiny(tiny_model, backend, position, csc, n_ctx):
    learner = fastprompt.create_learner("coop", tiny_model, NAMES, n_ctx=n_ctx, csc=csc, class_token_position=position)
    assert_equivalent(learner, images_for(tiny_model, 3, torch.float64), backend, TOL[torch.float64])


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_coop_one_class_word_init(tiny_model, backend):
    learner = fastprompt.create_learner("coop", tiny_model, ["dog"], ctx_init="a photo of a")
    assert learner.n_ctx == 4
    assert_equivalent(learner, images_for(tiny_model, 2, torch.float64), backend, TOL[torch.float64])


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("n_ctx,ctx_init", [(3, ""), (4, "a photo of a")])
def test_cocoop_tiny(tiny_model, backend, n_ctx, ctx_init):
    learner = fastprompt.create_learner("cocoop", tiny_model, NAMES, n_ctx=n_ctx, ctx_init=ctx_init)
    assert_equivalent(learner, images_for(tiny_model, 3, torch.float64), backend, TOL[torch.float64])


def test_cocoop_one_class(tiny_model):
    learner = fastprompt.create_learner("cocoop", tiny_model, ["dog"])
    assert_equivalent(learner, images_for(tiny_model, 2, torch.float64), "torch", TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("position", ["end", "middle"])
def test_coop_vitb16_stanford_cars(vitb16_f64, dtype, position):
    model, tokenizer = vitb16_f64
    model = model.to(dtype)
    names = fastprompt.load_classnames("stanford_cars")
    longest = sorted(names, key=lambda n: len(tokenizer.encode(n)))[-3:]
    learner = fastprompt.create_learner("coop", model, longest, n_ctx=16, class_token_position=position, tokenizer=tokenizer)
    assert learner.text.plan.max_len == 35  # "Lamborghini Gallardo LP 570-4 Superleggera 2012" with M=16
    assert_equivalent(learner, images_for(model, 1, dtype), "auto", TOL[dtype])
    model.double()


@pytest.mark.parametrize("csc", [False, True], ids=["unified", "csc"])
def test_coop_vitb16_imagenet_odd_m(vitb16_f64, csc):
    model, tokenizer = vitb16_f64
    names = fastprompt.load_classnames("imagenet")
    longest = sorted(names, key=lambda n: len(tokenizer.encode(n)))[-2:] + names[:2]
    learner = fastprompt.create_learner("coop", model, longest, n_ctx=7, csc=csc, tokenizer=tokenizer)
    assert_equivalent(learner, images_for(model, 1, torch.float64), "auto", TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cocoop_vitb16_imagenet(vitb16_f64, dtype):
    model, tokenizer = vitb16_f64
    model = model.to(dtype)
    names = fastprompt.load_classnames("imagenet")
    longest = sorted(names, key=lambda n: len(tokenizer.encode(n)))[-3:]
    learner = fastprompt.create_learner("cocoop", model, longest, tokenizer=tokenizer)
    assert_equivalent(learner, images_for(model, 2, dtype), "auto", TOL[dtype])
    model.double()


def test_float32_tiny_all_positions():
    model = tiny_clip(dtype=torch.float32)
    for position in ("end", "middle", "front"):
        learner = fastprompt.create_learner("coop", model, NAMES, n_ctx=5, class_token_position=position)
        assert_equivalent(learner, images_for(model, 2, torch.float32), "auto", TOL[torch.float32])


# ---------------------------------------------------------------------- every op on its Triton kernel
TRITON_RUNS = pytest.mark.skipif(
    not (torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1"),
    reason="Triton needs a GPU or TRITON_INTERPRET=1",
)


@TRITON_RUNS
@pytest.mark.parametrize("dtype", [torch.float32])  # the Triton attention kernel computes fp32/fp16/bf16
@pytest.mark.parametrize("method,kwargs", [
    ("coop", {"n_ctx": 3}), ("coop", {"n_ctx": 3, "class_token_position": "middle"}),
    ("coop", {"n_ctx": 2, "csc": True}), ("cocoop", {"n_ctx": 2, "ctx_init": ""}),
])
def test_learners_on_triton_kernels(method, kwargs, dtype):
    """The whole fast engine with every op on its Triton kernel (the CPU interpreter here: tiny shapes)."""
    model = tiny_clip(dtype=dtype)
    learner = fastprompt.create_learner(method, model, NAMES[:3], **kwargs)
    assert_equivalent(learner, images_for(model, 2, dtype), "triton", TOL[dtype])
