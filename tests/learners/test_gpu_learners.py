"""Every registered learner, one training step on a device: fast path == reference on the loss, the logits and
the gradient of every trainable tensor.

* float32, backends "auto" and "triton": relative error <= 1e-5 (docs/design.md, exactness contract).
* bf16 autocast: the reference itself is rounded, so (as ``tests/test_autocast.py``) the fast path's error
  against the float32 reference must be within a small factor of the autocast reference's own error.

The bodies take a ``device``. On CUDA every learner of ``fastprompt.list_learners()`` runs (marked ``gpu``,
skipped without one). On the CPU a small subset runs here, so the test bodies themselves are known to work
(and the CPU "auto" path is checked at float32 through ``compute_loss``, which the float64 learner tests do
not all go through).

A step is ``learner.compute_loss(images, labels)`` in training mode, as the Trainer calls it. Randomness
inside a step (VPT/VAPT/CaPT dropout, DPC's hard-negative draw) is re-seeded identically before the reference
and the fast run: the fast paths draw the same masks / negatives in the official order, so the comparison
stays exact. Trainable tensors are moved off their initial values first: at init several are exactly zero or
identical (VAPT's token projector, MaPLe's deep projections), which makes some gradients exactly zero and a
gradient comparison prove nothing.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import pytest
import torch

import fastprompt
from tests.conftest import rel_err, tiny_clip
from tests.learner_setups import NUM_CLASSES, SETUPS, make_learner, synthetic_splits

TOL_FP32 = 1e-5
CUDA = pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")
CPU_SUBSET = ["coop", "maple", "vapt"]  # fp32 "auto" on the CPU (the CUDA run takes every learner)


def _all_learners() -> List[str]:
    return sorted(fastprompt.list_learners())


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    return synthetic_splits(tmp_path_factory.mktemp("gpu_learners"))


def _build(method: str, device: str, splits):
    """A fresh tiny float32 CLIP and learner on ``device``, trainable tensors perturbed, training mode."""
    if method not in SETUPS:
        raise AssertionError(f"learner {method!r} has no tiny setup in tests/learner_setups.py")
    clip = tiny_clip(dtype=torch.float32)
    learner = make_learner(method, clip, splits, device=device, attach=True)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in learner.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.device, p.dtype))
    return learner.train()


def _inputs(learner, device: str, batch: int = 4) -> Tuple[torch.Tensor, torch.Tensor]:
    size = learner.clip.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    g = torch.Generator().manual_seed(5)
    images = torch.randn(batch, 3, *size, generator=g).to(device)
    labels = torch.tensor([1, 0, 3, 2][:batch]) % NUM_CLASSES
    return images, labels.to(device)


def _step(learner, images, labels, backend: str, amp: Optional[torch.dtype] = None) -> Dict[str, object]:
    """One step: {"loss": [], "logits": [...], "grads": [every trainable tensor's gradient]} as float32."""
    learner.backend = backend
    params = [p for p in learner.parameters() if p.requires_grad]
    torch.manual_seed(0)  # dropout masks (every device's generator)
    rng = getattr(learner, "rng", None)
    if rng is not None and hasattr(rng, "seed"):
        rng.seed(0)  # DPC's hard-negative miner
    device_type = images.device.type
    with torch.autocast(device_type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        loss, logits = learner.compute_loss(images, labels)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    names = [n for n, p in learner.named_parameters() if p.requires_grad]
    missing = [n for n, g in zip(names, grads) if g is None]
    assert not missing, f"{learner.method} ({backend}): no gradient reaches {missing}"
    return {"loss": loss.detach().float(), "logits": logits.detach().float(),
            "grads": [g.detach().float() for g in grads], "names": names}


def _logits_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """rel_err over the finite logits; non-finite ones (SoftCPT masks other tasks' columns with -inf) must be
    the same entries with the same values in both."""
    finite = torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), finite) or not torch.equal(a[~finite], b[~finite]):
        return float("inf")
    return rel_err(a[finite], b[finite])


def _errors(a: Dict[str, object], b: Dict[str, object]) -> Dict[str, float]:
    """Relative errors of a against b: loss, logits and each gradient by parameter name."""
    out = {"loss": rel_err(a["loss"], b["loss"]), "logits": _logits_err(a["logits"], b["logits"])}
    out.update({f"grad {n}": rel_err(x, y) for n, x, y in zip(b["names"], a["grads"], b["grads"])})
    return out


def check_fp32(method: str, device: str, backend: str, splits) -> None:
    learner = _build(method, device, splits)
    images, labels = _inputs(learner, device)
    ref = _step(learner, images, labels, "reference")
    assert torch.isfinite(ref["loss"]) and ref["loss"] != 0
    for name, g in zip(ref["names"], ref["grads"]):
        assert g.abs().sum() > 0, f"{method}: reference gradient of {name} is zero: the test would prove nothing"
    fast = _step(learner, images, labels, backend)
    assert fast["logits"].shape == ref["logits"].shape
    errs = _errors(fast, ref)
    bad = {k: v for k, v in errs.items() if not v <= TOL_FP32}
    assert not bad, f"{method} on {device} ({backend}, fp32): {bad}"


def check_bf16_autocast(method: str, device: str, backend: str, splits) -> None:
    learner = _build(method, device, splits)
    images, labels = _inputs(learner, device)
    exact = _step(learner, images, labels, "reference")  # float32, no autocast: the yardstick
    ref = _step(learner, images, labels, "reference", amp=torch.bfloat16)
    fast = _step(learner, images, labels, backend, amp=torch.bfloat16)
    assert fast["logits"].shape == ref["logits"].shape
    ref_err, fast_err = _errors(ref, exact), _errors(fast, exact)
    worst_ref = max(ref_err.values())
    assert worst_ref > 0, "autocast did not change the reference's arithmetic: the test proves nothing"
    # Against the reference's worst error over loss, logits and gradients (as tests/test_autocast.py), not
    # key by key: a single rounded scalar (the loss) can land luckily close for one path and not the other.
    bad = {k: (v, ref_err[k]) for k, v in fast_err.items() if not v <= 4 * worst_ref + 1e-3}
    assert not bad, f"{method} on {device} ({backend}, bf16 autocast; worst reference error {worst_ref:.2e}): {bad}"
    assert all(torch.isfinite(g).all() for g in fast["grads"]) and torch.isfinite(fast["loss"])


# ---------------------------------------------------------------------- CUDA: every registered learner
def test_every_registered_learner_has_a_setup():
    assert set(_all_learners()) <= set(SETUPS), sorted(set(_all_learners()) - set(SETUPS))


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("method", _all_learners())
@pytest.mark.parametrize("device", [CUDA])
def test_fp32_fast_equals_reference(device, method, backend, splits):
    check_fp32(method, device, backend, splits)


@pytest.mark.parametrize("method", _all_learners())
@pytest.mark.parametrize("device", [CUDA])
def test_bf16_autocast_fast_matches_reference(device, method, splits):
    check_bf16_autocast(method, device, "auto", splits)


# ---------------------------------------------------------------------- CPU: the same bodies on a subset
@pytest.mark.parametrize("method", CPU_SUBSET)
def test_fp32_fast_equals_reference_cpu(method, splits):
    check_fp32(method, "cpu", "auto", splits)


def test_bf16_autocast_cpu_coop(splits):
    check_bf16_autocast("coop", "cpu", "auto", splits)
