"""Dassl's learning-rate schedule, as a closed form per epoch.

Every CoOp-family config uses ``LR_SCHEDULER: cosine`` with ``WARMUP_EPOCH: 1``, ``WARMUP_TYPE: constant``,
``WARMUP_CONS_LR: 1e-5`` and ``WARMUP_RECOUNT: True``. Dassl steps its scheduler once per epoch (after the
last batch), so the learning rate is a function of the epoch index alone:

    epoch e <  W :  lr = warmup_lr                                  (every group, whatever its base lr)
    epoch e >= W :  lr = 0.5 * base_lr * (1 + cos(pi * (e - W) / E))  (each group from its own base lr)

with W = warm-up epochs and E = max epochs (spec methods_coop_family.md §7.8). With W = 1, epoch 1 trains at
the full base lr, and the last epoch at 0.5 * lr * (1 + cos(pi * (E - 2) / E)): the lr never reaches 0.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List

import torch

__all__ = ["dassl_lr", "EpochLRSchedule"]

WARMUP_TYPES = ("constant", "none")


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


class EpochLRSchedule:
    """Sets every optimizer group's lr for an epoch from :func:`dassl_lr` (call :meth:`set_epoch` before it).

    Stateless apart from the groups' base lrs (kept in each group as ``"initial_lr"``), so resuming only needs
    the epoch number; :meth:`state_dict` is stored in checkpoints anyway to detect a changed schedule.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_epoch: int, warmup_epoch: int = 1,
                 warmup_lr: float = 1e-5, warmup_type: str = "constant"):
        if warmup_type not in WARMUP_TYPES:
            raise ValueError(f"warmup_type must be one of {WARMUP_TYPES}, got {warmup_type!r}")
        self.optimizer = optimizer
        self.max_epoch, self.warmup_epoch = int(max_epoch), int(warmup_epoch)
        self.warmup_lr, self.warmup_type = float(warmup_lr), warmup_type
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.epoch = -1

    def lrs(self, epoch: int) -> List[float]:
        """The lr of each group at ``epoch``."""
        return [dassl_lr(epoch, g["initial_lr"], self.max_epoch, self.warmup_epoch, self.warmup_lr, self.warmup_type)
                for g in self.optimizer.param_groups]

    def set_epoch(self, epoch: int) -> List[float]:
        for group, lr in zip(self.optimizer.param_groups, self.lrs(epoch)):
            group["lr"] = lr
        self.epoch = epoch
        return self.lrs(epoch)

    def state_dict(self) -> Dict[str, Any]:
        return {"max_epoch": self.max_epoch, "warmup_epoch": self.warmup_epoch, "warmup_lr": self.warmup_lr,
                "warmup_type": self.warmup_type, "epoch": self.epoch,
                "base_lrs": [g["initial_lr"] for g in self.optimizer.param_groups]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("max_epoch", "warmup_epoch", "warmup_lr", "warmup_type", "base_lrs"):
            if state.get(key) != mine[key]:
                raise ValueError(f"schedule {key} differs: checkpoint {state.get(key)!r}, run {mine[key]!r}")
        self.epoch = int(state["epoch"])
