"""Training beyond one process: data parallelism under ``torchrun`` and class-sharded text encoding.

Data parallel. Launch with ``torchrun --nproc_per_node N -m fastprompt.cli train ...`` (NCCL on GPUs, gloo on
CPUs). Every rank holds the same learner (trainable tensors broadcast from rank 0), takes its rows of each global
batch (``EpochBatchSampler``: the global order does not depend on N), and after ``backward`` the gradients of
the trainable tensors are averaged with one all-reduce (what DDP does; done by hand because the trainer calls
``learner.compute_loss`` rather than ``forward``, and the trainable tensors are a few KB). With batch b per rank,
N ranks compute exactly the step one process computes with batch N*b, up to the summation order.

Class sharding (``class_sharding=True``). For a huge label space (ImageNet-21k: 21k prompts per step) the text
side dominates. Rank r encodes only classes [C*r/N, C*(r+1)/N) and the features are all-gathered *with
gradients* (:func:`all_gather_with_grad`): in backward, rank r receives the sum over all ranks of dL_q/dT_r, so
after the usual gradient average every rank holds the gradient of the global loss. Supported for learners
whose logits are ``logit_scale * cos(image, per-class text)`` with the plain cross-entropy loss and which
expose ``text_features_for(class_indices) -> [K, E]`` normalised features: **coop** (unified and class-specific
contexts). Others (CoCoOp: per-image contexts; KgCoOp/DePT/...: extra loss terms) raise a ValueError.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastprompt.learners.base import PromptLearner

__all__ = ["DistInfo", "init_distributed", "dist_info", "average_gradients", "broadcast_trainable",
           "all_gather_with_grad", "shard_slice", "supports_class_sharding", "sharded_compute_loss", "all_reduce_sum"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """Rank and world size of the initialised process group (or a single process)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return DistInfo()


def init_distributed(device: str = "cpu", backend: Optional[str] = None) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR...).

    A single process (no WORLD_SIZE, or WORLD_SIZE=1) needs no group. ``backend`` defaults to NCCL for a CUDA
    device, gloo otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return dist_info()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = backend or ("nccl" if str(device).startswith("cuda") else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://")
    return dist_info()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist_info().enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """Replace each trainable tensor's grad by its mean over ranks (one flat all-reduce; a missing grad counts
    as zeros, e.g. a rank whose batch never reached a parameter)."""
    info = dist_info()
    if not info.enabled:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def broadcast_trainable(module: torch.nn.Module) -> None:
    """Copy rank 0's trainable tensors to every rank (identical starting points)."""
    if not dist_info().enabled:
        return
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's [n_r, ...] along dim 0; backward returns this rank's rows of sum_q dL_q/dT."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        info = dist_info()
        sizes = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
        all_sizes = [torch.zeros_like(sizes) for _ in range(info.world_size)]
        dist.all_gather(all_sizes, sizes)
        all_sizes = [int(s.item()) for s in all_sizes]
        # all_gather needs equal shapes: pad each slice to the largest, then trim.
        biggest = max(all_sizes)
        padded = x.new_zeros((biggest,) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(info.world_size)]
        dist.all_gather(parts, padded.contiguous())
        ctx.sizes, ctx.rank = all_sizes, info.rank
        return torch.cat([part[:n] for part, n in zip(parts, all_sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # every rank's loss used every slice
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[n_r, ...] on rank r -> [sum_r n_r, ...] on every rank, differentiable (identity for one process)."""
    if not dist_info().enabled:
        return x
    return _AllGatherWithGrad.apply(x)


def shard_slice(n: int, rank: int, world_size: int) -> slice:
    """Contiguous, near-equal slice of range(n) owned by ``rank`` (the first n % world ranks get one more)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def supports_class_sharding(learner) -> Optional[str]:
    """None when ``learner`` can train class-sharded, else the reason it cannot."""
    if not callable(getattr(learner, "text_features_for", None)):
        return f"{learner.method} has no text_features_for(class_indices) hook (its text side is not per class)"
    cls = type(learner)
    if cls.compute_loss is not PromptLearner.compute_loss or cls.loss is not PromptLearner.loss:
        return f"{learner.method} has its own loss terms, which the class-sharded path does not compute"
    return None


def sharded_compute_loss(learner, images: torch.Tensor, labels: torch.Tensor):
    """``learner.compute_loss`` with the classes split over the ranks.

    images [b, 3, H, W] and labels [b] are this rank's rows of the global batch. Returns (loss [], logits
    [b, C]); the loss is this rank's mean, and :func:`average_gradients` then yields the global gradient.
    """
    reason = supports_class_sharding(learner)
    if reason is not None:
        raise ValueError(f"class sharding is not available: {reason}; supported: coop")
    info = dist_info()
    C = len(learner.classnames)
    if C < info.world_size:
        raise ValueError(f"class sharding needs at least one class per process: {C} classes, {info.world_size} processes")
    s = shard_slice(C, info.rank, info.world_size)
    local = learner.text_features_for(torch.arange(s.start, s.stop))
    text = all_gather_with_grad(local)  # [C, E], the same on every rank
    image = F.normalize(learner.encode_images(images), dim=-1)
    logits = learner.logit_scale * image.to(text.dtype) @ text.t()
    return learner.loss(logits, labels), logits
