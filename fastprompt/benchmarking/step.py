"""``fastprompt bench --step``: one whole training step of a CLIP prompt learner, official reference vs fast path.

A step is what :class:`fastprompt.training.Trainer` runs per batch, on images already on the device:
``compute_loss`` (image tower, text side, the method's loss; under autocast for bf16/fp16), ``backward`` and
SGD's ``step()`` (momentum 0.9, weight decay 5e-4: Dassl's), with the learner's own parameter groups. Both paths
start from the same state (trainable tensors and optimizer restored between them), are compared on the loss and
every gradient, then timed. Weights are random: speed does not depend on them.

``benchmarks/test_bench_training_step.py`` times the same steps under pytest-benchmark.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from fastprompt.benchmarking.timing import markdown_table, rel_err, sync
from fastprompt.learners import create_learner, get_learner_class, list_learners

__all__ = ["STEP_METHODS", "StepResult", "TrainStep", "step_learner", "run_step_case", "format_step_table",
           "step_results_json"]

# The learners with a training-step setup (``bench_setup`` on the learner class; DPC gets an in-memory
# hard-negative library, DAPT random prototypes, SoftCPT consecutive classes read as tasks: ``bench_prepare``).
STEP_METHODS = tuple(m for m in list_learners() if get_learner_class(m).bench_setup is not None)


@dataclass
class StepResult:
    method: str
    classes: int
    batch: int
    device: str
    precision: str
    reference_ms: float
    fast_ms: float
    speedup: float
    max_rel_err: float
    reference_peak_mb: Optional[float] = None
    fast_peak_mb: Optional[float] = None


def _image_size(model) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def step_learner(method: str, model, tokenizer, classnames: Sequence[str], device: torch.device,
                 dataset: str = "imagenet", tasks: int = 2, perturb: float = 0.02):
    """A learner of ``method`` over ``classnames`` on ``model``, in train mode on ``device``, ready to step.

    ``perturb`` adds N(0, perturb^2) to every trainable tensor (seeded), so zero-initialised ones (VAPT's
    projector, MaPLe's deep prompts in some configs) carry gradient and the comparison covers them.
    """
    if method not in STEP_METHODS:
        raise ValueError(f"no training-step setup for {method!r}; choose from {', '.join(STEP_METHODS)}")
    classes, kwargs = get_learner_class(method).bench_setup(list(classnames), dataset=dataset, tasks=tasks)
    torch.manual_seed(0)
    learner = create_learner(method, model, classes, tokenizer=tokenizer, **kwargs).to(device)
    learner.bench_prepare(torch.Generator().manual_seed(3))
    if perturb:
        with torch.no_grad():
            g = torch.Generator().manual_seed(7)
            for p in learner.parameters():
                if p.requires_grad:
                    p.add_(perturb * torch.randn(p.shape, generator=g).to(p.device, p.dtype))
    return learner.train()


class TrainStep:
    """One training step of ``learner`` on fixed ``images`` [B, 3, H, W] and ``labels`` [B], with the state
    (trainable tensors, optimizer) restorable so that the reference and the fast step start from the same place.

    ``step(capture=True)`` returns (loss, [gradient of each trainable tensor]) as float32 copies.
    """

    def __init__(self, learner, images: torch.Tensor, labels: torch.Tensor, amp_dtype: Optional[torch.dtype] = None,
                 lr: float = 0.002):
        self.learner, self.images, self.labels, self.amp_dtype = learner, images, labels, amp_dtype
        self.device = images.device
        groups = learner.param_groups(lr) if hasattr(learner, "param_groups") else \
            [{"params": [p for p in learner.parameters() if p.requires_grad]}]
        self.params = [p for g in groups for p in g["params"] if p.requires_grad]
        self.opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=5e-4)
        self._saved = [p.detach().clone() for p in self.params]

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def __call__(self, capture: bool = False):
        learner = self.learner
        torch.manual_seed(0)  # dropout masks: the same in both paths
        rng = getattr(learner, "rng", None)
        if rng is not None and hasattr(rng, "seed"):
            rng.seed(0)  # DPC's hard-negative draw
        self.opt.zero_grad(set_to_none=True)
        with self._autocast():
            loss, _ = learner.compute_loss(self.images, self.labels)
        loss.backward()
        out = None
        if capture:
            out = (loss.detach().float(), [p.grad.detach().float().clone() for p in self.params if p.grad is not None])
        self.opt.step()
        return out

    def restore(self) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, self._saved):
                p.copy_(v)
        self.opt.state.clear()

    def compare(self, set_backend: Callable[[str], None], fast_backend: str = "auto") -> float:
        """Largest relative error of the fast step's loss and gradients against the reference step's."""
        set_backend("reference")
        ref = self(capture=True)
        self.restore()
        set_backend(fast_backend)
        fast = self(capture=True)
        self.restore()
        if not ref[1] or len(fast[1]) != len(ref[1]):
            raise RuntimeError(f"the fast step produced {len(fast[1])} gradients, the reference {len(ref[1])}")
        return max([rel_err(fast[0], ref[0])] + [rel_err(f, r) for f, r in zip(fast[1], ref[1])])


def _timed(step: TrainStep, repeats: int, warmup: int):
    """(median ms, peak MB or None) of ``repeats`` steps after ``warmup`` untimed ones; the state is restored."""
    device = step.device
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    step.restore()
    return statistics.median(times), peak


def run_step_case(method: str, model, tokenizer, classnames: Sequence[str], batch: int, device="cpu",
                  precision: str = "fp32", repeats: int = 1, warmup: int = 1, fast_backend: str = "auto",
                  tasks: int = 2, dataset: str = "imagenet") -> StepResult:
    """Reference vs fast training step of ``method`` (``batch`` images, the classes ``classnames``), same run.

    ``dataset``: whose hand-crafted template KgCoOp / CaPT / ProGrad use. ``precision``: "fp32" (no autocast) or "bf16" / "fp16" (autocast on an fp32 model, as the Trainer runs AMP).
    The reference's first timed call doubles as its warm-up when ``warmup`` is 1 (seconds per step on a CPU).
    """
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in amp:
        raise ValueError(f"precision must be one of {sorted(amp)}, got {precision!r}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    device = torch.device(device)
    model = model.to(device=device, dtype=torch.float32).eval()
    learner = step_learner(method, model, tokenizer, classnames, device, dataset=dataset, tasks=tasks)
    gen = torch.Generator().manual_seed(1)
    px = _image_size(model)
    images = torch.randn(batch, 3, px, px, generator=gen).to(device)
    # Distinct labels while batch <= classes (DPC's miner expects a batch of different classes).
    labels = (torch.arange(batch) * 7 % len(classnames)).to(device)
    step = TrainStep(learner, images, labels, amp_dtype=amp[precision])

    def set_backend(b):
        learner.backend = b

    err = step.compare(set_backend, fast_backend)
    set_backend("reference")
    ref_ms, ref_mb = _timed(step, repeats, max(warmup - 1, 0))
    set_backend(fast_backend)
    fast_ms, fast_mb = _timed(step, repeats, warmup)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    return StepResult(method, len(classnames), batch, name, precision, ref_ms, fast_ms, ref_ms / fast_ms, err,
                      ref_mb, fast_mb)


def format_step_table(results: List[StepResult]) -> str:
    head = ["method", "classes", "batch", "device", "precision", "reference ms", "fast ms", "speed-up",
            "max rel err", "peak MB ref / fast"]
    rows = []
    for r in results:
        peak = "-" if r.reference_peak_mb is None else f"{r.reference_peak_mb:.0f} / {r.fast_peak_mb:.0f}"
        rows.append([r.method, str(r.classes), str(r.batch), r.device, r.precision, f"{r.reference_ms:.1f}",
                     f"{r.fast_ms:.1f}", f"{r.speedup:.1f}x", f"{r.max_rel_err:.1e}", peak])
    return markdown_table(head, rows)


def step_results_json(results: List[StepResult]) -> str:
    return json.dumps([dataclasses.asdict(r) for r in results], indent=2)
