"""PromptedVisionEncoder: no prompts == the tower's own output; fast == reference on outputs and gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fastprompt.encoders.prompted_vision import PromptedVisionEncoder
from tests.conftest import randomize_layernorms, rel_err, tiny_clip

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def open_clip_vit(dtype=torch.float64, layers=4, lnd=False, **kw):
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    v = VisionTransformer(image_size=32, patch_size=8, width=32, layers=layers, heads=2, mlp_ratio=2.0, output_dim=16, **kw)
    if lnd:  # the sequence-first layout of older open_clip versions
        v.transformer.batch_first = False
        for blk in v.transformer.resblocks:
            blk.attn.batch_first = False
    return randomize_layernorms(v).to(dtype).eval()


def timm_vit(dtype=torch.float64, **kw):
    import timm

    torch.manual_seed(0)
    kw.setdefault("num_classes", 5)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=4, **kw)
    return randomize_layernorms(m).to(dtype).eval()


def images(dtype, batch=3):
    return torch.randn(batch, 3, 32, 32, dtype=dtype)


def own_output(visual, x):
    """What the tower itself returns: open_clip ``visual(x)``; timm pre-logits features."""
    if hasattr(visual, "forward_head"):
        return visual.forward_head(visual.forward_features(x), pre_logits=True)
    return visual(x)


TOWERS = {
    "open_clip": lambda dt: open_clip_vit(dt),
    "open_clip_lnd": lambda dt: open_clip_vit(dt, lnd=True),
    "open_clip_avg": lambda dt: open_clip_vit(dt, pool_type="avg"),
    "open_clip_ln_after_pool": lambda dt: open_clip_vit(dt, final_ln_after_pool=True),
    "open_clip_attn_pool": lambda dt: open_clip_vit(dt, attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2),
    "clip_tiny": lambda dt: tiny_clip(dtype=dt).visual,
    "timm": lambda dt: timm_vit(dt),
    "timm_avg_regs": lambda dt: timm_vit(dt, global_pool="avg", reg_tokens=2),
    "timm_pre_norm": lambda dt: timm_vit(dt, pre_norm=True),  # a real norm_pre (LayerNorm)
    "timm_avg_regs_pre_norm": lambda dt: timm_vit(dt, global_pool="avg", reg_tokens=2, pre_norm=True),
}


@pytest.mark.parametrize("tower", list(TOWERS))
@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
def test_no_prompts_is_the_towers_output(tower, fast):
    visual = TOWERS[tower](torch.float64)
    x = images(torch.float64)
    enc = PromptedVisionEncoder(visual, "append")
    assert all(m.known for m in enc._math), "fast block math not used"
    assert rel_err(enc(x, None, fast=fast), own_output(visual, x)) <= 1e-12


def _prompt_dict(width, depth, n, keys, batch, dtype):
    gen = {}
    for k in keys:
        shape = (batch, n, width) if k == keys[-1] else (n, width)  # one batch-specific layer
        gen[k] = torch.randn(*shape, dtype=dtype, requires_grad=True)
    return gen


def _check(enc, x, prompts, params, tol):
    ref = enc(x, prompts, fast=False)
    up = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * up).sum(), params)
    out = enc(x, prompts, fast=True)
    g_fast = torch.autograd.grad((out * up).sum(), params)
    assert rel_err(out, ref) <= tol, rel_err(out, ref)
    for a, b in zip(g_fast, g_ref):
        assert b.abs().sum() > 0, "reference gradient is zero: the test would prove nothing"
        assert rel_err(a, b) <= tol, rel_err(a, b)
    return ref


DEPTHS = {"shallow": [0], "deep_all": [0, 1, 2, 3], "deep_some": [0, 2]}


DICT_CASES = [(t, i, d) for t in ("open_clip", "open_clip_lnd", "timm", "timm_avg_regs") for i in ("append", "after_cls")
              for d in DEPTHS] + [("open_clip_attn_pool", "after_cls", "deep_some"), ("clip_tiny", "append", "deep_all")]


@pytest.mark.parametrize("tower,insert,deep", DICT_CASES)
def test_dict_prompts_fast_equals_reference_f64(tower, insert, deep):
    visual = TOWERS[tower](torch.float64)
    enc = PromptedVisionEncoder(visual, insert)
    x = images(torch.float64)
    keys = [k for k in DEPTHS[deep] if k < enc.depth]
    prompts = _prompt_dict(enc.width, enc.depth, 3, keys, x.shape[0], torch.float64)
    out = _check(enc, x, prompts, list(prompts.values()), TOL[torch.float64])
    # the prompts really change the features
    assert rel_err(out, own_output(visual, x)) > 1e-3


@pytest.mark.parametrize("tower", ["open_clip", "timm"])
@pytest.mark.parametrize("insert", ["append", "after_cls"])
def test_dict_prompts_fast_equals_reference_f32(tower, insert):
    visual = TOWERS[tower](torch.float32)
    enc = PromptedVisionEncoder(visual, insert)
    x = images(torch.float32)
    prompts = _prompt_dict(enc.width, enc.depth, 5, [0, 1, 3], x.shape[0], torch.float32)
    _check(enc, x, prompts, list(prompts.values()), TOL[torch.float32])


class _Generator(nn.Module):
    """A callable prompt source: prompts of block i >= 1 from the patch tokens (like VAPT), None at skip."""

    def __init__(self, width, n, prefix, skip=(), dtype=torch.float64):
        super().__init__()
        self.p0 = nn.Parameter(torch.randn(n, width, dtype=dtype))
        self.w = nn.Parameter(torch.randn(n, width, dtype=dtype) * 0.3)
        self.prefix, self.skip, self.seen = prefix, set(skip), []

    def forward(self, i, x):
        self.seen.append((i, x.detach().clone()))
        if i == 0:
            return self.p0
        if i in self.skip:
            return None
        pooled = torch.tanh(x[:, self.prefix:]).mean(1, keepdim=True)  # [B, 1, D]
        return pooled * self.w + x[:, :1] * 0.1


@pytest.mark.parametrize("tower", ["open_clip", "timm_avg_regs"])
@pytest.mark.parametrize("insert", ["append", "after_cls"])
@pytest.mark.parametrize("skip", [(), (2,)], ids=["every_layer", "none_at_2"])
def test_callable_prompts_fast_equals_reference(tower, insert, skip):
    visual = TOWERS[tower](torch.float64)
    enc = PromptedVisionEncoder(visual, insert)
    x = images(torch.float64)
    gen = _Generator(enc.width, 4, enc.num_prefix_tokens, skip)
    _check(enc, x, gen, list(gen.parameters()), TOL[torch.float64])
    # both paths hand the callable the same tower tokens [B, T, D] (prompt rows removed), block by block
    half = len(gen.seen) // 2
    ref_calls, fast_calls = gen.seen[:half], gen.seen[half:half * 2]
    assert [i for i, _ in ref_calls] == list(range(enc.depth))
    T = enc.num_prefix_tokens + enc.grid_size[0] * enc.grid_size[1]
    for (i, a), (j, b) in zip(ref_calls, fast_calls):
        assert i == j and a.shape == (x.shape[0], T, enc.width)
        assert rel_err(b, a) <= 1e-12


def test_callable_none_at_block0_means_no_prompts():
    visual = TOWERS["open_clip"](torch.float64)
    enc = PromptedVisionEncoder(visual, "append")
    x = images(torch.float64)
    calls = []

    def source(i, h):
        calls.append(i)
        return None

    for fast in (False, True):
        assert rel_err(enc(x, source, fast=fast), visual(x)) <= 1e-12
    assert calls == [0, 0]


def test_append_goes_through_ln_pre():
    """MaPLe convention: appended prompts are normalised by ln_pre with the tokens (scaling them changes
    nothing only if they passed through ln_pre), prompts at block 0 are placed after the patches."""
    visual = TOWERS["open_clip"](torch.float64)
    enc = PromptedVisionEncoder(visual, "append")
    x = images(torch.float64)
    p = torch.randn(2, enc.width, dtype=torch.float64)
    a = enc(x, {0: p}, fast=False)
    b = enc(x, {0: 5 * p}, fast=False)  # LayerNorm is scale-invariant up to eps
    assert rel_err(a, b) <= 1e-5
    visual.ln_pre = nn.Identity()
    c, d = enc(x, {0: p}, fast=False), enc(x, {0: 5 * p}, fast=False)
    assert rel_err(c, d) > 1e-3


def test_errors():
    visual = TOWERS["open_clip"](torch.float64)
    with pytest.raises(ValueError, match="insert"):
        PromptedVisionEncoder(visual, "before_cls")
    with pytest.raises(TypeError, match="VisionTransformer"):
        PromptedVisionEncoder(nn.Linear(3, 3))
    from open_clip.modified_resnet import ModifiedResNet

    with pytest.raises(TypeError, match="ModifiedResNet"):
        PromptedVisionEncoder(ModifiedResNet(layers=(1, 1, 1, 1), output_dim=16, heads=2, image_size=64, width=16))
    enc = PromptedVisionEncoder(visual, "append")
    x = images(torch.float64)
    p = torch.randn(2, enc.width, dtype=torch.float64)
    with pytest.raises(ValueError, match="key 0"):
        enc(x, {1: p})
    with pytest.raises(ValueError, match="block indices"):
        enc(x, {0: p, 4: p})
    with pytest.raises(ValueError, match="block 0 inserted 2"):
        enc(x, {0: p, 1: torch.randn(3, enc.width, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"\[n, 32\]"):
        enc(x, {0: torch.randn(2, 7, dtype=torch.float64)})
    with pytest.raises(TypeError, match="dict"):
        enc(x, [p])
    with pytest.raises(TypeError, match="after_ln_pre"):
        PromptedVisionEncoder(visual, "after_cls", after_ln_pre="yes")
    with pytest.raises(ValueError, match="images"):
        enc(x[0])


# ---------------------------------------------------------------------- after_ln_pre (DAPT)
POST_LN_CASES = [(t, "after_cls", "shallow") for t in ("open_clip", "open_clip_lnd", "clip_tiny", "timm_pre_norm")] + [
    ("open_clip", "after_cls", "deep_some"), ("open_clip_ln_after_pool", "after_cls", "shallow"),
    ("clip_tiny", "append", "deep_all"), ("timm_avg_regs_pre_norm", "after_cls", "deep_all"),
]


@pytest.mark.parametrize("tower,insert,deep", POST_LN_CASES)
def test_after_ln_pre_fast_equals_reference_f64(tower, insert, deep):
    visual = TOWERS[tower](torch.float64)
    enc = PromptedVisionEncoder(visual, insert, after_ln_pre=True)
    assert all(m.known for m in enc._math), "fast block math not used"
    x = images(torch.float64)
    keys = [k for k in DEPTHS[deep] if k < enc.depth]
    prompts = _prompt_dict(enc.width, enc.depth, 3, keys, x.shape[0], torch.float64)
    out = _check(enc, x, prompts, list(prompts.values()), TOL[torch.float64])
    # a different function from the before-ln_pre insertion (where the tower has a non-identity ln_pre)
    before = PromptedVisionEncoder(visual, insert)(x, prompts, fast=False)
    assert rel_err(out, before) > 1e-3


@pytest.mark.parametrize("tower", ["open_clip", "clip_tiny"])
def test_after_ln_pre_fast_equals_reference_f32(tower):
    visual = TOWERS[tower](torch.float32)
    enc = PromptedVisionEncoder(visual, "after_cls", after_ln_pre=True)
    x = images(torch.float32)
    p = {0: (torch.rand(1, 16, enc.width) * 0.2 - 0.1).expand(x.shape[0], -1, -1).clone().requires_grad_()}
    _check(enc, x, p, [p[0]], TOL[torch.float32])


def test_after_ln_pre_callable_fast_equals_reference():
    """Call 0 of a callable gets the tokens after ln_pre (where the prompts go in)."""
    visual = TOWERS["open_clip"](torch.float64)
    enc = PromptedVisionEncoder(visual, "after_cls", after_ln_pre=True)
    x = images(torch.float64)
    gen = _Generator(enc.width, 4, enc.num_prefix_tokens, skip=(2,))
    _check(enc, x, gen, list(gen.parameters()), TOL[torch.float64])
    first = gen.seen[0][1]
    v = visual
    t = v.conv1(x).flatten(2).transpose(1, 2)
    t = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), t], dim=1) + v.positional_embedding
    assert rel_err(first, v.ln_pre(t)) <= 1e-12


def official_dapt_image_encoder(visual, x, ctx):
    """The official DAPT ``ImageEncoder`` (mlvlab/DAPT trainers/dapt.py), transcribed: embed, ``ln_pre``,
    [CLS, prompts, patches], the tower's transformer, ``ln_post`` on CLS, ``proj``."""
    t = visual.conv1(x).flatten(2).permute(0, 2, 1)
    t = torch.cat([visual.class_embedding + torch.zeros(t.shape[0], 1, t.shape[-1], dtype=t.dtype), t], dim=1)
    t = visual.ln_pre(t + visual.positional_embedding)
    t = torch.cat([t[:, :1], ctx.expand(t.shape[0], -1, -1), t[:, 1:]], dim=1)
    t = visual.transformer(t)
    return visual.ln_post(t[:, 0]) @ visual.proj


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
def test_after_ln_pre_is_the_official_dapt_image_encoder(fast):
    visual = TOWERS["clip_tiny"](torch.float64)
    enc = PromptedVisionEncoder(visual, "after_cls", after_ln_pre=True)
    x = images(torch.float64)
    ctx = torch.randn(1, 5, enc.width, dtype=torch.float64)
    expected = official_dapt_image_encoder(visual, x, ctx)
    assert rel_err(enc(x, {0: ctx[0]}, fast=fast), expected) <= 1e-10
    # the prompts skip ln_pre: scaling them changes the features (it would not through a LayerNorm)
    assert rel_err(enc(x, {0: 5 * ctx[0]}, fast=fast), expected) > 1e-3
