"""Dassl's learning-rate schedule, as a closed form per epoch.

Every CoOp-family config uses ``LR_SCHEDULER: cosine`` with ``WARMUP_EPOCH: 1``, ``WARMUP_TYPE: constant``,
``WARMUP_CONS_LR: 1e-5`` and ``WARMUP_RECOUNT: True``. Dassl steps its scheduler once per epoch (after the
last batch), so the learning rate is a function of the epoch index alone:

    epoch e <  W :  lr = warmup_lr                                  (every group, whatever its base lr)
    epoch e >= W :  lr = 0.5 * base_lr * (1 + cos(pi * (e - W) / E))  (each group from its own base lr)

with W = warm-up epochs and E = max epochs (Dassl's cosine scheduler with a constant warm-up). With W = 1, epoch 1 trains at
the full base lr, and the last epoch at 0.5 * lr * (1 + cos(pi * (E - 2) / E)): the lr never reaches 0.

VPT / VAPT (``KMnP/vpt`` ``src/solver/lr_scheduler.py::WarmupCosineSchedule``, a ``LambdaLR`` that the
trainer steps once per epoch, after the last batch; VAPT uses the same solver) use schedule
kind ``"warmup_cosine"``: a linear warm-up *from 0* over W epochs, then a half cosine down to 0 over the
remaining E - W epochs:

    epoch e <  W :  lr = base_lr * e / max(1, W)                               (epoch 0 trains at lr 0)
    epoch e >= W :  lr = base_lr * max(0, 0.5 * (1 + cos(pi * (e - W) / max(1, E - W))))

Its base lr is VPT's "effective" lr, grid lr * batch / 256 (``tune_vtab.py``); the Trainer applies that
scaling when ``TrainConfig.lr_batch_scaling`` is on (see :mod:`fastprompt.training.config`).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List

import torch

__all__ = ["dassl_lr", "vpt_lr", "epoch_lr", "EpochLRSchedule", "SCHEDULES"]

WARMUP_TYPES = ("constant", "none")
SCHEDULES = ("cosine", "warmup_cosine")  # Dassl's; VPT's


def dassl_lr(epoch: int, base_lr: float, max_epoch: int, warmup_epoch: int = 1, warmup_lr: float = 1e-5,
             warmup_type: str = "constant") -> float:
    """The learning rate Dassl trains epoch ``epoch`` (0-based) at.

    Args:
        epoch: 0-based epoch index, 0 <= epoch < max_epoch.
        base_lr: the group's base learning rate (``OPTIM.LR``, or a staged group's own lr).
        max_epoch: ``OPTIM.MAX_EPOCH`` (the cosine period E).
        warmup_epoch: ``OPTIM.WARMUP_EPOCH`` (W); 0 or warmup_type "none" disables the warm-up.
        warmup_lr: ``OPTIM.WARMUP_CONS_LR``.
    """
    if warmup_type not in WARMUP_TYPES:
        raise ValueError(f"warmup_type must be one of {WARMUP_TYPES}, got {warmup_type!r}")
    if max_epoch < 1:
        raise ValueError(f"max_epoch must be >= 1, got {max_epoch}")
    if not 0 <= epoch < max_epoch:
        raise ValueError(f"epoch must be in [0, {max_epoch}), got {epoch}")
    if warmup_type == "none":
        warmup_epoch = 0
    if epoch < warmup_epoch:
        return float(warmup_lr)
    # WARMUP_RECOUNT=True: the cosine successor restarts its count at 0 after the warm-up.
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * (epoch - warmup_epoch) / max_epoch))


def vpt_lr(epoch: int, base_lr: float, max_epoch: int, warmup_epoch: int = 10) -> float:
    """The learning rate VPT / VAPT train epoch ``epoch`` (0-based) at (``WarmupCosineSchedule``, cycles 0.5).

    Args:
        epoch: 0-based epoch index, 0 <= epoch < max_epoch.
        base_lr: the group's base (already batch-scaled) learning rate, ``SOLVER.BASE_LR``.
        max_epoch: ``SOLVER.TOTAL_EPOCH`` (E).
        warmup_epoch: ``SOLVER.WARMUP_EPOCH`` (W); 0 starts the cosine at epoch 0.
    """
    if max_epoch < 1:
        raise ValueError(f"max_epoch must be >= 1, got {max_epoch}")
    if not 0 <= epoch < max_epoch:
        raise ValueError(f"epoch must be in [0, {max_epoch}), got {epoch}")
    if warmup_epoch < 0:
        raise ValueError(f"warmup_epoch must be >= 0, got {warmup_epoch}")
    if epoch < warmup_epoch:
        return base_lr * float(epoch) / float(max(1, warmup_epoch))
    progress = float(epoch - warmup_epoch) / float(max(1, max_epoch - warmup_epoch))
    return base_lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def epoch_lr(kind: str, epoch: int, base_lr: float, max_epoch: int, warmup_epoch: int, warmup_lr: float = 1e-5,
             warmup_type: str = "constant") -> float:
    """The lr of schedule ``kind`` ("cosine": :func:`dassl_lr`; "warmup_cosine": :func:`vpt_lr`, which has no
    warm-up constant or type) at 0-based ``epoch``."""
    if kind == "cosine":
        return dassl_lr(epoch, base_lr, max_epoch, warmup_epoch, warmup_lr, warmup_type)
    if kind == "warmup_cosine":
        return vpt_lr(epoch, base_lr, max_epoch, warmup_epoch)
    raise ValueError(f"lr schedule must be one of {SCHEDULES}, got {kind!r}")


class EpochLRSchedule:
    """Sets every optimizer group's lr for an epoch from :func:`epoch_lr` of schedule ``kind`` (Dassl's
    "cosine" by default, VPT's "warmup_cosine"); call :meth:`set_epoch` before each epoch.

    Stateless apart from the groups' base lrs (kept in each group as ``"initial_lr"``), so resuming only needs
    the epoch number; :meth:`state_dict` is stored in checkpoints anyway to detect a changed schedule.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_epoch: int, warmup_epoch: int = 1,
                 warmup_lr: float = 1e-5, warmup_type: str = "constant", kind: str = "cosine"):
        if kind not in SCHEDULES:
            raise ValueError(f"lr schedule must be one of {SCHEDULES}, got {kind!r}")
        if warmup_type not in WARMUP_TYPES:
            raise ValueError(f"warmup_type must be one of {WARMUP_TYPES}, got {warmup_type!r}")
        self.optimizer = optimizer
        self.max_epoch, self.warmup_epoch = int(max_epoch), int(warmup_epoch)
        self.warmup_lr, self.warmup_type, self.kind = float(warmup_lr), warmup_type, kind
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.epoch = -1

    def lrs(self, epoch: int) -> List[float]:
        """The lr of each group at ``epoch``."""
        return [epoch_lr(self.kind, epoch, g["initial_lr"], self.max_epoch, self.warmup_epoch, self.warmup_lr,
                         self.warmup_type) for g in self.optimizer.param_groups]

    def set_epoch(self, epoch: int) -> List[float]:
        for group, lr in zip(self.optimizer.param_groups, self.lrs(epoch)):
            group["lr"] = lr
        self.epoch = epoch
        return self.lrs(epoch)

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "max_epoch": self.max_epoch, "warmup_epoch": self.warmup_epoch, "warmup_lr": self.warmup_lr,
                "warmup_type": self.warmup_type, "epoch": self.epoch,
                "base_lrs": [g["initial_lr"] for g in self.optimizer.param_groups]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        mine = self.state_dict()
        state = dict(state)
        state.setdefault("kind", "cosine")  # checkpoints written before VPT's schedule existed
        for key in ("kind", "max_epoch", "warmup_epoch", "warmup_lr", "warmup_type", "base_lrs"):
            if state.get(key) != mine[key]:
                raise ValueError(f"schedule {key} differs: checkpoint {state.get(key)!r}, run {mine[key]!r}")
        self.epoch = int(state["epoch"])
