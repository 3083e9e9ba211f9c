"""Inputs and comparison helpers shared by the assemble tests of every backend."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from fastprompt.ops.assemble.reference import assemble_reference


@dataclass
class Case:
    name: str
    G: int
    M: int
    D: int
    C: int
    L: int
    N: Optional[int]  # None: every (g, c) pair, in order
    layout: str  # end | middle | front | random
    shift: bool
    pos_offset: int = 0



def _slot_table(C: int, L: int, M: int, layout: str, gen: torch.Generator) -> torch.Tensor:
    """[C, L] slots: -1 = fixed token; CoOp-style layouts with class names of 1..3 tokens after a SOS token."""
    slot = torch.full((C, L), -1, dtype=torch.int64)
    if layout == "random":  # any position may hold any context vector, some used twice, some never
        hit = torch.rand(C, L, generator=gen) < 0.5
        slot[hit] = torch.randint(0, M, (int(hit.sum()),), generator=gen)
        return slot
    for c in range(C):
        name = [-1] * (1 + int(torch.randint(0, 3, (1,), generator=gen)))
        ctx = list(range(M))
        seq = {
            "end": [-1] + ctx + name,
            "middle": [-1] + ctx[: M // 2] + name + ctx[M // 2 :],
            "front": [-1] + name + ctx,
        }[layout]
        slot[c] = torch.tensor((seq + [-1] * L)[:L], dtype=torch.int64)
    return slot


def make_inputs(case: Case, dtype=torch.float64, device="cpu", seed=0, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    G, M, D, C, L = case.G, case.M, case.D, case.C, case.L

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    ctx = randn(G, M, D)
    shift = randn(G, D) if case.shift else None
    fixed = randn(C, L, D)
    pos = randn(case.pos_offset + L + 3, D)
    slot = _slot_table(C, L, M, case.layout, gen)
    if case.N is None:
        g_idx = torch.arange(G).repeat_interleave(C)
        c_idx = torch.arange(C).repeat(G)
    else:  # random order, repeated (g, c) pairs guaranteed
        g_idx = torch.randint(0, G, (case.N,), generator=gen)
        c_idx = torch.randint(0, C, (case.N,), generator=gen)
        k = min(3, case.N // 2)
        g_idx[-k:], c_idx[-k:] = g_idx[:k], c_idx[:k]
    ctx, shift, fixed, slot, pos, g_idx, c_idx = [
        t.to(device) if t is not None else None for t in (ctx, shift, fixed, slot, pos, g_idx, c_idx)
    ]
    if requires_grad:
        ctx.requires_grad_(True)
        if shift is not None:
            shift.requires_grad_(True)
    return ctx, shift, fixed, slot, pos, case.pos_offset, g_idx, c_idx


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if b.numel() == 0:
        return 0.0
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def run_with_grads(fn, args, grad_out_seed=1):
    """out, grad_ctx, grad_shift for a random upstream gradient."""
    ctx, shift = args[0], args[1]
    out = fn(*args)
    gen = torch.Generator().manual_seed(grad_out_seed)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype).to(out.device)
    wrt = [ctx] + ([shift] if shift is not None else [])
    grads = torch.autograd.grad(out, wrt, grad_out)
    return out, grads[0], (grads[1] if shift is not None else None)


def assert_matches(fn, args, ref_args, tol):
    out, g_ctx, g_shift = run_with_grads(fn, args)
    r_out, r_ctx, r_shift = run_with_grads(assemble_reference, ref_args)
    assert out.dtype == r_out.dtype and out.shape == r_out.shape
    for name, a in (("out", out), ("grad_ctx", g_ctx), ("grad_shift", g_shift)):
        assert a is None or not torch.isnan(a).any(), f"{name} has NaN"
    assert rel_err(out, r_out) <= tol, f"forward rel err {rel_err(out, r_out)}"
    assert rel_err(g_ctx, r_ctx) <= tol, f"grad_ctx rel err {rel_err(g_ctx, r_ctx)}"
    if r_shift is not None:
        assert g_shift.dtype == r_shift.dtype
        assert rel_err(g_shift, r_shift) <= tol, f"grad_shift rel err {rel_err(g_shift, r_shift)}"
