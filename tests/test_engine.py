"""PromptedTextEncoder directly: prompt-batch patterns and the deep-prompt hook, fast == reference."""
from __future__ import annotations

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from fastprompt.classplan import build_class_plan
from fastprompt.encoders.prompted_text import PromptedTextEncoder
from tests.conftest import rel_err, tiny_clip

NAMES = ["dog", "red panda", "Lamborghini Gallardo LP 570-4 Superleggera 2012", "cat"]


def reference_prompts(enc, ctx, shift, g_idx, c_idx):
    """Full-length prompts [N, T, D] by concatenation ("end" position)."""
    M = ctx.shape[1]
    rows = ctx[g_idx] + (shift[g_idx].unsqueeze(1) if shift is not None else 0)
    return torch.cat([enc.token_embeds[c_idx, :1], rows, enc.token_embeds[c_idx, 1 + M :]], dim=1)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("pattern", ["one-context", "per-group", "diagonal", "random-pairs"])
def test_prompt_batch_patterns(backend, pattern):
    model = tiny_clip()
    M, C = 3, len(NAMES)
    enc = PromptedTextEncoder(model, build_class_plan(NAMES, SimpleTokenizer(), M))
    G = {"one-context": 1, "per-group": 2, "diagonal": C, "random-pairs": 3}[pattern]
    ctx = torch.randn(G, M, 64, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(G, 64, dtype=torch.float64, requires_grad=True)
    if pattern == "diagonal":
        g_idx = c_idx = torch.arange(C)
    elif pattern == "random-pairs":
        g_idx, c_idx = torch.randint(0, G, (7,)), torch.randint(0, C, (7,))
    else:
        g_idx, c_idx = torch.arange(G).repeat_interleave(C), torch.arange(C).repeat(G)
    ref = enc.reference_features(reference_prompts(enc, ctx, shift, g_idx, c_idx), enc.token_ids[c_idx])
    fast = enc.fast_features(ctx, shift, g_idx, c_idx, backend=backend)
    w = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * w).sum(), (ctx, shift))
    fast_grads = torch.autograd.grad((fast * w).sum(), (ctx, shift))
    assert rel_err(fast, ref) < 1e-10
    for gf, gr in zip(fast_grads, ref_grads):
        assert rel_err(gf, gr) < 1e-10


def test_deep_prompts_hook():
    model = tiny_clip()
    M, C = 2, len(NAMES)
    enc = PromptedTextEncoder(model, build_class_plan(NAMES, SimpleTokenizer(), M))
    ctx = torch.randn(1, M, 64, dtype=torch.float64, requires_grad=True)
    deep = {i: torch.randn(M, 64, dtype=torch.float64, requires_grad=True) for i in (1, 2)}
    g_idx, c_idx = torch.zeros(C, dtype=torch.long), torch.arange(C)
    ref = enc.reference_features(reference_prompts(enc, ctx, None, g_idx, c_idx), enc.token_ids, deep_prompts=deep)
    fast = enc.fast_features(ctx, None, g_idx, c_idx, deep_prompts=deep)
    w = torch.randn_like(ref)
    params = (ctx, deep[1], deep[2])
    for gf, gr in zip(torch.autograd.grad((fast * w).sum(), params), torch.autograd.grad((ref * w).sum(), params)):
        assert gr.abs().sum() > 0 and rel_err(gf, gr) < 1e-10
    assert rel_err(fast, ref) < 1e-10
    middle = PromptedTextEncoder(model, build_class_plan(NAMES, SimpleTokenizer(), M, position="middle"))
    with pytest.raises(ValueError, match="deep prompts"):
        middle.fast_features(ctx, None, g_idx, c_idx, deep_prompts=deep)
