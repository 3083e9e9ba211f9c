"""The training loop: SGD + Dassl's per-epoch schedule, AMP, checkpoints every epoch, exact resume.

The loop talks to a learner only through the PromptLearner interface (``compute_loss``, ``param_groups``,
``on_epoch_end``, ``attach_train_data``, ``train``/``eval``, ``named_parameters``), so every registered learner
trains here. What the official Dassl loop does and this one matches:

* ``torch.optim.SGD(param_groups, lr, momentum=0.9, weight_decay=5e-4, dampening=0, nesterov=False)``;
* the lr is set once per epoch (:mod:`fastprompt.training.schedule`): Dassl's cosine, or for VPT / VAPT their
  linear-warm-up cosine with the lr scaled by global batch / 256 (``TrainConfig.lr_batch_scaling``);
* the train loader drops the last incomplete batch when the data fill at least one batch (Dassl's
  ``drop_last=is_train and len(data_source) >= batch_size``);
* the final model is the last epoch's (``TEST.FINAL_MODEL last_step``).

Where it differs, on purpose: each epoch's shuffling and augmentation randomness is re-seeded from
(seed, epoch), so a run resumed from its epoch-k checkpoint is bit-identical to the uninterrupted one on CPU;
``precision`` "fp16"/"bf16"/"amp" is autocast mixed precision (fp16 with a GradScaler) on an fp32 model rather
than CoOp's whole-model fp16 weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from fastprompt.training.checkpoint import (
    CHECKPOINT_FILE, CheckpointError, check_compatible, load_checkpoint, rng_state, save_checkpoint, set_rng_state,
)
from fastprompt.training.config import VPT_REFERENCE_BATCH, TrainConfig, resolve_defaults
from fastprompt.training.console import EpochReporter, tensorboard_dir
from fastprompt.training.data import EpochBatchSampler, collate, epoch_seed
from fastprompt.training.distributed import average_gradients, broadcast_trainable, dist_info, sharded_compute_loss
from fastprompt.training.guards import EpochTaggedSampler, PerSampleSeeded, check_finite
from fastprompt.training.schedule import EpochLRSchedule

__all__ = ["Trainer", "seed_everything", "autocast_dtype", "resolve_device", "LOG_FILE"]

LOG_FILE = "log.jsonl"


def seed_everything(seed: int) -> None:
    """Seed python ``random``, NumPy and torch (CPU and CUDA), as Dassl's ``set_random_seed``."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but no CUDA device is available")
    return dev


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """The autocast dtype of a precision ("amp" = fp16 as in CoOp's PREC amp), or None for no autocast."""
    return {"fp16": torch.float16, "amp": torch.float16, "bf16": torch.bfloat16}.get(precision)


class Trainer:
    """Train ``learner`` on ``train_set`` (a map-style dataset of ``(image [3, H, W], label)``).

    Args:
        learner: any registered PromptLearner.
        train_set: the training images (e.g. :class:`fastprompt.training.data.DatumDataset`).
        config: a :class:`TrainConfig`; fields left at None take the method's official values
            (:func:`fastprompt.training.config.resolve_defaults`).
        output_dir: where ``checkpoint.pt`` and ``log.jsonl`` go (None: no checkpoints, no log file).
        splits: the DatasetSplits handed to ``learner.attach_train_data`` (DPC, DAPT use it), or None.

    Learner state beyond the trainable tensors (PromptSRC's GPA sums, DAPT's prototypes) is checkpointed when
    the learner defines ``training_state_dict() -> dict | None`` and ``load_training_state_dict(state)``. A
    learner whose state also holds what ``attach_train_data`` builds sets ``training_state_includes_train_data
    = True``; a run resumed from such a state does not call ``attach_train_data`` again.
    """

    def __init__(self, learner, train_set, config: TrainConfig, output_dir: Optional[str] = None, splits=None):
        config = resolve_defaults(config)
        self.learner, self.train_set, self.cfg = learner, train_set, config
        self.output_dir, self.splits = output_dir, splits
        self.dist = dist_info()
        self.device = resolve_device(config.device)
        if config.class_sharding and self.dist.world_size == 1:
            pass  # one process: sharding is a no-op (the slice is every class)
        self.history: List[Dict[str, Any]] = []

    # ------------------------------------------------------------------ pieces
    @property
    def checkpoint_path(self) -> Optional[str]:
        return os.path.join(self.output_dir, CHECKPOINT_FILE) if self.output_dir else None

    def _log(self, record: Dict[str, Any]) -> None:
        self.history.append(record)
        if self.output_dir and self.dist.is_main:
            os.makedirs(self.output_dir, exist_ok=True)
            with open(os.path.join(self.output_dir, LOG_FILE), "a") as f:
                f.write(json.dumps(record) + "\n")

    def _build(self):
        cfg = self.cfg
        self.learner.to(self.device)
        broadcast_trainable(self.learner)
        groups = self.learner.param_groups(self.base_lr)
        if not any(p.requires_grad for g in groups for p in g["params"]):
            raise ValueError(f"{self.learner.method} has no trainable tensors")
        self.optimizer = torch.optim.SGD(groups, lr=self.base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                         dampening=0.0, nesterov=False)
        self.schedule = EpochLRSchedule(self.optimizer, cfg.epochs, cfg.warmup_epoch, cfg.warmup_lr, cfg.warmup_type,
                                        kind=cfg.lr_scheduler)
        self.amp_dtype = autocast_dtype(cfg.precision)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.sampler = EpochBatchSampler(len(self.train_set), cfg.batch_size, cfg.seed, shuffle=True, drop_last=None,
                                         rank=self.dist.rank, world_size=self.dist.world_size)
        self.loader = torch.utils.data.DataLoader(  # augmentation seeded per (seed, epoch, sample): guards.py
            PerSampleSeeded(self.train_set, cfg.seed), batch_sampler=EpochTaggedSampler(self.sampler),
            num_workers=cfg.num_workers, collate_fn=collate,
            pin_memory=self.device.type == "cuda",
        )

    def _payload(self, epoch: int) -> Dict[str, Any]:
        learner = self.learner
        extra = getattr(learner, "training_state_dict", None)
        return {
            "method": learner.method,
            "learner_config": dataclasses.asdict(learner.config),
            "classnames": list(learner.classnames),
            "trainable": {k: v.detach().cpu().clone() for k, v in learner.trainable_state_dict().items()},
            "learner_extra": extra() if callable(extra) else None,
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": epoch,
            "rng": rng_state(),
            "train_config": self.cfg.to_dict(),
            "history": self.history,
        }

    @property
    def base_lr(self) -> float:
        """The lr the optimizer groups start from: ``config.lr``, times global batch / 256 for VPT / VAPT."""
        lr = float(self.cfg.lr)
        if self.cfg.lr_batch_scaling:
            lr *= self.cfg.batch_size * self.dist.world_size / VPT_REFERENCE_BATCH
        return lr

    def _restore(self, path: str) -> int:
        payload = load_checkpoint(path)
        check_compatible(path, payload, self.learner, self.cfg.to_dict())
        try:
            self.learner.load_trainable_state_dict({k: v.to(self.device) for k, v in payload["trainable"].items()})
            self.optimizer.load_state_dict(payload["optimizer"])
            self.schedule.load_state_dict(payload["schedule"])
            if self.scaler is not None and payload["scaler"] is not None:
                self.scaler.load_state_dict(payload["scaler"])
            loader = getattr(self.learner, "load_training_state_dict", None)
            self.extra_restored = callable(loader) and payload.get("learner_extra") is not None
            if self.extra_restored:
                loader(payload["learner_extra"])
            set_rng_state(payload["rng"])
        except (ValueError, KeyError, RuntimeError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {path} cannot be restored into this run: {exc}") from exc
        self.history = list(payload.get("history") or [])
        return int(payload["epoch"])

    # ------------------------------------------------------------------ loop
    def fit(self, resume: bool = False, stop_after_epoch: Optional[int] = None) -> List[Dict[str, Any]]:
        """Train to ``config.epochs``; returns the per-epoch log records.

        Args:
            resume: continue from ``output_dir/checkpoint.pt`` (a missing one starts fresh). Without it, an
                existing checkpoint is an error, so a finished or interrupted run is never overwritten.
            stop_after_epoch: stop (as if interrupted) once this many epochs are done; for tests.
        """
        cfg = self.cfg
        self._build()
        start = 0
        self.extra_restored = False
        ckpt = self.checkpoint_path
        if ckpt and os.path.exists(ckpt):
            if not resume:
                raise FileExistsError(f"{ckpt} already exists; pass --resume to continue that run, or choose another output directory")
            start = self._restore(ckpt)
            self._log({"event": "resume", "epoch": start, "checkpoint": ckpt})
        else:
            self._log({"event": "start", "method": self.learner.method, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
                       "base_lr": self.base_lr,
                       "world_size": self.dist.world_size, "train_images": len(self.train_set),
                       "trainable_params": self.learner.num_trainable_parameters()})
        if self.splits is not None and not (self.extra_restored
                                            and getattr(self.learner, "training_state_includes_train_data", False)):
            self.learner.attach_train_data(self.splits)
        board = tensorboard_dir(cfg.tensorboard, cfg) if cfg.tensorboard and self.dist.is_main else None
        reporter = EpochReporter(cfg.epochs, start, cfg.progress and self.dist.is_main, board)
        for epoch in range(start, cfg.epochs):
            self._train_epoch(epoch)
            reporter.epoch_done(self.history[-1])  # a line per epoch stays on screen, with the run's ETA
            self.learner.on_epoch_end(epoch, cfg.epochs)
            if ckpt and self.dist.is_main:
                save_checkpoint(ckpt, self._payload(epoch + 1))
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
                break
        reporter.close()
        return self.history

    def _train_epoch(self, epoch: int) -> None:
        cfg, learner = self.cfg, self.learner
        # Everything random in this epoch (shuffle, augmentation, dropout) follows from (seed, epoch), so a
        # resumed run redraws exactly what the uninterrupted one drew. Ranks > 0 mix in their rank: the
        # augmentations of different ranks must not be copies of each other.
        s = epoch_seed(cfg.seed, epoch)
        if self.dist.rank > 0:
            s = epoch_seed(s & 0xFFFFFFFF, self.dist.rank)
        seed_everything(s)
        self.sampler.set_epoch(epoch)
        lrs = self.schedule.set_epoch(epoch)
        learner.train()
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]
        # Loss and accuracy accumulate on the device and are read to the host once, at the epoch's log record
        # (or per step only when the progress bar shows them): no host sync per step. The float64 sum is the
        # same arithmetic as a host-side one (IEEE double multiply-add), so logs and resumes are unchanged.
        acc_dtype = torch.float64 if self.device.type != "mps" else torch.float32
        loss_sum = torch.zeros((), dtype=acc_dtype, device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        seen, scored = 0, 0
        t0 = time.perf_counter()
        bar = None
        if cfg.progress and self.dist.is_main:
            bar = tqdm(total=len(self.sampler), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True)
        for batch_idx, (images, labels) in enumerate(self.loader):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                        else contextlib.nullcontext())
            with autocast:
                if cfg.class_sharding and self.dist.enabled:
                    loss, logits = sharded_compute_loss(learner, images, labels)
                else:
                    loss, logits = learner.compute_loss(images, labels)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                average_gradients(params)
                if cfg.grad_clip is not None:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                average_gradients(params)
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                self.optimizer.step()
            n = labels.shape[0]
            loss_sum += loss.detach().to(acc_dtype) * n
            # Training accuracy from class logits [B, C]; learners whose training logits are something else
            # (DPC: [B', B'] contrastive logits over the batch grown by its hard negatives) are not scored.
            if logits.dim() == 2 and logits.shape[0] == n:
                correct += (logits.detach().argmax(-1) == labels).sum()
                scored += n
            seen += n
            if cfg.print_freq and self.dist.is_main and (batch_idx + 1) % cfg.print_freq == 0:  # TRAIN.PRINT_FREQ
                line = (f"epoch {epoch + 1}/{cfg.epochs} batch {batch_idx + 1}/{len(self.sampler)} "
                        f"loss {float(loss.detach()):.4f} lr {lrs[0]:.2e}")
                (bar.write if bar is not None else print)(line)
            if bar is not None:
                dt = max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}", lr=f"{lrs[0]:.2e}", img_s=f"{seen * self.dist.world_size / dt:.1f}")
                bar.update(1)
        if bar is not None:
            bar.close()
        totals = torch.tensor([float(loss_sum), float(correct), float(seen), float(scored)], dtype=torch.float64)
        if self.dist.enabled:
            torch.distributed.all_reduce(totals)
        check_finite(float(totals[0]), [(n, p) for n, p in learner.named_parameters() if p.requires_grad], epoch,
                     lrs[0], self.checkpoint_path)
        seconds = time.perf_counter() - t0
        images_total = int(totals[2])
        self._log({
            "event": "epoch", "epoch": epoch + 1, "lr": lrs, "loss": float(totals[0] / max(images_total, 1)),
            "train_acc": 100.0 * float(totals[1]) / float(totals[3]) if totals[3] > 0 else None, "images": images_total,
            "seconds": round(seconds, 4), "img_per_s": round(images_total / max(seconds, 1e-9), 2),
        })
