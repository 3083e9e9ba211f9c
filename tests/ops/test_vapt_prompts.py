"""The ``vapt_prompts`` op (VAPT's per-layer prompt generator): the reference against the official module
composition, and the fused Triton kernels against the reference (outputs, gradients of x and every parameter).

Triton runs on the CPU under TRITON_INTERPRET=1 (tiny shapes) and on CUDA (tests marked ``gpu``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastprompt.ops.vapt_prompts import OP, dropout_masks, vapt_prompts
from fastprompt.ops.vapt_prompts.reference import vapt_prompts_reference
from tests.conftest import rel_err

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_triton = pytest.mark.skipif(
    not (INTERPRET or torch.cuda.is_available()), reason="Triton needs CUDA or TRITON_INTERPRET=1"
)
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
NAMES = ("x", "ln_weight", "ln_bias", "kernel", "tok_weight", "tok_bias", "w1", "w2")


@dataclass
class Case:
    name: str
    B: int
    H: int
    W: int
    D: int
    N: int
    Dh: int
    K: int = 2
    masks: bool = False
    scale: float = 1.0


CASES = [
    Case("tiny", 2, 4, 4, 16, 3, 4),
    Case("odd_multi_block", 2, 5, 6, 80, 17, 8, masks=True),  # 30 patches (2 blocks), 2 channel chunks, N > 16
    Case("k3_one_token_scaled", 1, 5, 4, 24, 1, 5, K=3, scale=0.7),
    Case("masks", 3, 4, 5, 20, 4, 8, masks=True),
]
BY_NAME = {c.name: c for c in CASES}


def make_inputs(case: Case, dtype=torch.float64, device="cpu", requires_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * std).to(dtype)  # noqa: E731
    Pc = (case.H - case.K + 1) * (case.W - case.K + 1)
    x = r(case.B, case.H * case.W, case.D) * 2 + 0.5  # non-zero mean: the LayerNorm must centre
    tensors = [x, 1 + r(case.D, std=0.1), r(case.D, std=0.1), r(case.K, case.K), r(case.N, Pc, std=0.3), r(case.N),
               r(case.Dh, case.D, std=0.3), r(case.D, case.Dh, std=0.3)]
    tensors = [t.to(device).requires_grad_(requires_grad) for t in tensors]
    cm = hm = None
    if case.masks:
        torch.manual_seed(seed + 1)
        cm, hm = dropout_masks(case.B, case.D, case.N, case.Dh, 0.25, 0.3, dtype, device)
    return tensors, cm, hm


def run(fn, case, tensors, cm, hm, upstream=None):
    x, lw, lb, k, tw, tb, w1, w2 = tensors
    out = fn(x, lw, lb, 1e-5, k, tw, tb, w1, w2, (case.H, case.W), cm, hm, case.scale)
    if upstream is None:
        upstream = torch.randn_like(out)
    grads = torch.autograd.grad((out * upstream).sum(), tensors)
    return out.detach(), grads, upstream


def assert_close(case, fn, dtype, device="cpu"):
    tensors, cm, hm = make_inputs(case, dtype, device)
    ref, g_ref, up = run(vapt_prompts_reference, case, tensors, cm, hm)
    out, g_out, _ = run(fn, case, tensors, cm, hm, up)
    tol = TOL[dtype]
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= tol, rel_err(out, ref)
    for name, a, b in zip(NAMES, g_out, g_ref):
        assert b.abs().sum() > 0, f"reference gradient of {name} is zero: the test would prove nothing"
        assert rel_err(a, b) <= tol, (name, rel_err(a, b))


# ------------------------------------------------------------------ the reference is the official computation
class _OfficialLayer(nn.Module):
    """The official modules of one adaptive layer, rebuilt from their definition (LayerNorm over [CLS, patches],
    CLS dropped, channel-shared conv via an expanded kernel, Dropout2d, token Linear, PromptMLP)."""

    def __init__(self, D, N, Dh, H, W, K, p_chan, p_mlp):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.kernel = nn.Parameter(torch.randn(1, 1, K, K))
        self.drop2d = nn.Dropout2d(p_chan)
        self.linear = nn.Linear((H - K + 1) * (W - K + 1), N)
        self.fc1, self.fc2 = nn.Linear(D, Dh, bias=False), nn.Linear(Dh, D, bias=False)
        self.p_mlp, self.H, self.W, self.K = p_mlp, H, W, K
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0, 0.3)

    def forward(self, cls_and_patches):
        B, _, D = cls_and_patches.shape
        y = self.norm(cls_and_patches)[:, 1:].permute(0, 2, 1).reshape(B, D, self.H, self.W)
        z = F.conv2d(y, self.kernel.expand(D, 1, self.K, self.K), groups=D)
        z = self.drop2d(z).reshape(B, D, -1)
        t = self.linear(z).permute(0, 2, 1)
        h = F.dropout(F.relu(self.fc1(t)), self.p_mlp, self.training)
        return self.fc2(h) + t


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train_same_seed"])
def test_reference_matches_official_modules(train):
    B, H, W, D, N, Dh = 3, 4, 5, 12, 3, 4
    layer = _OfficialLayer(D, N, Dh, H, W, 2, 0.25, 0.3).double().train(train)
    tokens = torch.randn(B, 1 + H * W, D, dtype=torch.float64)
    torch.manual_seed(7)
    official = layer(tokens)
    torch.manual_seed(7)  # masks drawn in the official order, with the same generator calls (CPU)
    cm, hm = dropout_masks(B, D, N, Dh, 0.25 if train else 0.0, 0.3 if train else 0.0, torch.float64, "cpu")
    ours = vapt_prompts_reference(
        tokens[:, 1:], layer.norm.weight, layer.norm.bias, layer.norm.eps, layer.kernel[0, 0], layer.linear.weight,
        layer.linear.bias, layer.fc1.weight, layer.fc2.weight, (H, W), cm, hm,
    )
    assert (cm is None) == (not train)
    assert rel_err(ours, official) <= 1e-14


def test_reference_equals_the_folded_linear_map():
    """The identity the kernels use: conv then token projection == one [N, H*W] map A over the patches."""
    case = BY_NAME["k3_one_token_scaled"]
    (x, lw, lb, k, tw, tb, w1, w2), _, _ = make_inputs(case, requires_grad=False)
    H, W, K = case.H, case.W, case.K
    Hc, Wc = H - K + 1, W - K + 1
    A = torch.zeros(case.N, H, W, dtype=x.dtype)
    for a in range(K):
        for b in range(K):
            A[:, a:a + Hc, b:b + Wc] += k[a, b] * tw.view(-1, Hc, Wc)
    t = torch.einsum("np,bpd->bnd", A.view(case.N, -1), F.layer_norm(x, (case.D,), lw, lb, 1e-5)) + tb[:, None]
    expect = t + F.linear(F.relu(F.linear(t, w1)), w2) * case.scale
    got = vapt_prompts_reference(x, lw, lb, 1e-5, k, tw, tb, w1, w2, (H, W), scale=case.scale)
    assert rel_err(got, expect) <= 1e-13


# ------------------------------------------------------------------ Triton == reference
def _triton(*args):
    from fastprompt.ops.vapt_prompts.triton_impl import vapt_prompts_triton

    return vapt_prompts_triton(*args)


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the kernels should fully overwrite starts as NaN."""
    import fastprompt.ops.vapt_prompts.triton_impl as mod

    monkeypatch.setattr(mod, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_triton_matches_reference(name, dtype, poisoned):
    assert_close(BY_NAME[name], _triton, dtype)


@needs_triton
def test_triton_backward_is_deterministic():
    case = BY_NAME["masks"]
    tensors, cm, hm = make_inputs(case, torch.float32)
    _, g1, up = run(_triton, case, tensors, cm, hm)
    _, g2, _ = run(_triton, case, tensors, cm, hm, up)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@needs_triton
def test_opcheck():
    """schema, fake tensors, autograd registration and aot_dispatch of both custom ops."""
    import fastprompt.ops.vapt_prompts.triton_impl  # noqa: F401  (registers the ops)

    case = BY_NAME["tiny"]
    (x, lw, lb, k, tw, tb, w1, w2), _, _ = make_inputs(case, torch.float32)
    cm, hm = dropout_masks(case.B, case.D, case.N, case.Dh, 0.2, 0.2, torch.float32, "cpu")
    args = (x, lw, lb, 1e-5, k, tw, tb, w1, w2, case.H, case.W, cm, hm, 1.0)
    torch.library.opcheck(torch.ops.fastprompt.vapt_prompts_triton_fwd.default, args)
    with torch.no_grad():
        _out, t, hid, mu, rstd = torch.ops.fastprompt.vapt_prompts_triton_fwd(*args)
    bargs = (torch.randn(case.B, case.N, case.D), x.detach(), lw.detach(), lb.detach(), k.detach(), tw.detach(),
             w1.detach(), w2.detach(), case.H, case.W, cm, hm, 1.0, t, hid, mu, rstd)
    torch.library.opcheck(torch.ops.fastprompt.vapt_prompts_triton_bwd.default, bargs)


# ------------------------------------------------------------------ dispatch and errors
def test_dispatch():
    case = BY_NAME["tiny"]
    tensors, _, _ = make_inputs(case, requires_grad=False)
    assert OP.resolve("auto", torch.device("cpu")) == "reference"  # auto never picks the interpreter
    out = vapt_prompts(*tensors[:3], 1e-5, *tensors[3:], (case.H, case.W), backend="auto")
    assert out.shape == (case.B, case.N, case.D)
    with pytest.raises(ValueError, match="no 'compiled' backend"):
        vapt_prompts(*tensors[:3], 1e-5, *tensors[3:], (case.H, case.W), backend="compiled")


def test_bad_shapes():
    case = BY_NAME["tiny"]
    (x, lw, lb, k, tw, tb, w1, w2), _, _ = make_inputs(case, requires_grad=False)
    with pytest.raises(ValueError, match="grid"):
        vapt_prompts_reference(x, lw, lb, 1e-5, k, tw, tb, w1, w2, (3, 4))
    with pytest.raises(ValueError, match="tok_weight"):
        vapt_prompts_reference(x, lw, lb, 1e-5, k, tw[:, :-1], tb, w1, w2, (4, 4))
    with pytest.raises(ValueError, match="chan_mask"):
        vapt_prompts_reference(x, lw, lb, 1e-5, k, tw, tb, w1, w2, (4, 4), chan_mask=torch.ones(1, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_triton_cuda_vitb16_shapes(dtype):
    case = Case("vitb16", 8, 14, 14, 768, 10, 8, masks=True)
    assert_close(case, _triton, dtype, device="cuda")


@pytest.mark.gpu
def test_triton_cuda_autocast_matches_reference_under_autocast():
    case = Case("vitb16_amp", 4, 14, 14, 768, 10, 8, masks=True)
    tensors, cm, hm = make_inputs(case, torch.float32, "cuda")
    x, lw, lb, k, tw, tb, w1, w2 = tensors
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = vapt_prompts(x, lw, lb, 1e-5, k, tw, tb, w1, w2, (14, 14), cm, hm, backend="reference")
        out = vapt_prompts(x, lw, lb, 1e-5, k, tw, tb, w1, w2, (14, 14), cm, hm, backend="triton")
    assert out.dtype == ref.dtype == torch.bfloat16
    assert rel_err(out, ref) <= 2e-2
