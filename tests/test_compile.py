"""``fastprompt.compile`` / ``create_learner(..., compile=...)``: the fast text side through
``torch.compile(fullgraph=True)`` computes what the eager fast path computes, outputs and the gradient of every
trainable tensor. ``aot_eager`` (dynamo + autograd tracing, eager kernels) checks the traced graph in float64 at
1e-10; one inductor run (generated C++ kernels, float32) checks the fused code at the float32 bound."""
from __future__ import annotations

import pytest
import torch

import fastprompt
from tests.conftest import rel_err, tiny_clip

NAMES = ["cat", "dog", "big red fish", "a rather long class name"]


def _text_step(learner, v):
    learner.zero_grad(set_to_none=True)
    out = learner.class_text_features(v)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * weights).sum().backward()
    return out.detach().clone(), [p.grad.detach().clone() for p in learner.parameters() if p.requires_grad]


def _check(method, dtype, compile_opts, tol):
    clip = tiny_clip(dtype=dtype, text_layers=1)
    torch.manual_seed(0)
    learner = fastprompt.create_learner(method, clip, NAMES, n_ctx=2).train()
    v = torch.randn(2, int(clip.visual.output_dim), dtype=dtype)
    eager_out, eager_grads = _text_step(learner, v)
    fastprompt.compile(learner, compile_opts)
    assert learner.text.compile_options is not None
    for _ in range(2):  # the second call runs the cached graph
        out, grads = _text_step(learner, v)
        assert rel_err(out, eager_out) <= tol
        assert len(grads) == len(eager_grads) > 0
        for g, e in zip(grads, eager_grads):
            assert rel_err(g, e) <= tol
    fastprompt.compile(learner, False)
    assert learner.text.compile_options is None


@pytest.mark.parametrize("method", ["coop", "cocoop"])
def test_compiled_matches_eager_float64(method):
    torch._dynamo.reset()
    _check(method, torch.float64, {"backend": "aot_eager"}, 1e-10)


def test_compiled_inductor_float32(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # a private kernel cache: no shared state
    torch._dynamo.reset()
    _check("coop", torch.float32, True, 1e-5)


def test_compile_follows_set_classnames_and_checks_options():
    clip = tiny_clip(dtype=torch.float32, text_layers=1)
    learner = fastprompt.create_learner("coop", clip, NAMES, n_ctx=2, compile={"backend": "aot_eager"})
    assert learner.text.compile_options == {"backend": "aot_eager"}
    learner.set_classnames(NAMES[:2])
    assert learner.text.compile_options == {"backend": "aot_eager"}  # the new encoder is compiled too
    with pytest.raises(ValueError, match="compile: unknown option"):
        fastprompt.compile(learner, {"fullgraph": False})
    with pytest.raises(ValueError, match="compile: unknown mode"):
        fastprompt.compile(learner, "fastest")
