"""Training checkpoints: only the learnable tensors plus what an exact resume needs.

A checkpoint is one ``torch.save`` file (``checkpoint.pt`` in the run directory) holding the method, its
config, the class names, the learnable tensors, the optimizer / schedule / grad-scaler state, the number of
finished epochs and the RNG states (python, numpy, torch, CUDA). It is written to a temporary file first and
moved into place with ``os.replace`` (atomic on POSIX), so an interrupted write never damages the previous
checkpoint; the temporary name is unique per writer, and the leftovers of killed writers are removed. Loading checks every field and fails with :class:`CheckpointError` naming the file; nothing is
written while checking.
"""
from __future__ import annotations

import dataclasses
import os
import random
from typing import Any, Dict, Optional

import numpy as np
import torch

from fastprompt.io.atomic import atomic_write

__all__ = ["CheckpointError", "CHECKPOINT_FILE", "save_checkpoint", "load_checkpoint", "check_compatible",
           "rng_state", "set_rng_state"]

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = "fastprompt-train-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not belong to this run."""


def rng_state() -> Dict[str, Any]:
    """Every RNG the training loop touches, in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, payload: Dict[str, Any]) -> None:
    """Atomically write ``payload`` (see module doc) to ``path``."""
    payload = dict(payload, format=FORMAT, version=VERSION)
    # A unique temporary name per writer and call (two writers never share one), fsync'ed before the rename;
    # temporary files of killed writers are removed by the next write, so they do not pile up.
    atomic_write(path, lambda f: torch.save(payload, f))


_REQUIRED = ("method", "learner_config", "classnames", "trainable", "optimizer", "schedule", "epoch", "rng", "train_config")


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Read and structurally validate a checkpoint; :class:`CheckpointError` names ``path`` on any problem."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        # weights_only: a checkpoint is tensors and plain Python values only, so nothing in it can run code.
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fastprompt training checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {payload.get('version')}, this fastprompt reads {VERSION}")
    missing = [k for k in _REQUIRED if k not in payload]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}; it is damaged or from another tool")
    if not isinstance(payload["trainable"], dict) or not all(isinstance(v, torch.Tensor) for v in payload["trainable"].values()):
        raise CheckpointError(f"{path}: 'trainable' is not a mapping of tensors")
    return payload


# The TrainConfig fields that define what a run computes (not where or how fast it runs).
RUN_SETTING_KEYS = ("method", "model", "pretrained", "dataset", "shots", "seed", "subsample", "epochs", "batch_size",
                    "lr", "momentum", "weight_decay", "warmup_epoch", "warmup_lr", "warmup_type", "lr_scheduler",
                    "lr_batch_scaling", "precision", "grad_clip", "learner")


def check_compatible(path: str, payload: Dict[str, Any], learner, train_config: Optional[Dict[str, Any]] = None,
                     keys=RUN_SETTING_KEYS) -> None:
    """Raise :class:`CheckpointError` unless ``payload`` was written by the same method, learner config, class
    names, tensor shapes and (when given) the same run settings ``keys`` of ``train_config``."""
    if payload["method"] != learner.method:
        raise CheckpointError(f"{path} was written by method {payload['method']!r}, this run is {learner.method!r}")
    mine = dataclasses.asdict(learner.config)
    if payload["learner_config"] != mine:
        diff = {k: (payload["learner_config"].get(k), mine.get(k)) for k in set(mine) | set(payload["learner_config"])
                if payload["learner_config"].get(k) != mine.get(k)}
        raise CheckpointError(f"{path}: learner config differs (checkpoint, run): {diff}")
    if list(payload["classnames"]) != list(learner.classnames):
        raise CheckpointError(f"{path}: class names differ from this run's ({len(payload['classnames'])} vs {len(learner.classnames)} classes)")
    # Compare with what the learner itself saves (its trainable_state_dict), not only its requires_grad
    # parameters: DPC stores its frozen tuned prompt P beside the trained P'.
    own = learner.trainable_state_dict()
    stored = payload["trainable"]
    if set(own) != set(stored):
        raise CheckpointError(f"{path}: trainable tensors differ: missing {sorted(set(own) - set(stored))}, "
                              f"unexpected {sorted(set(stored) - set(own))}")
    for name, p in own.items():
        if tuple(stored[name].shape) != tuple(p.shape):
            raise CheckpointError(f"{path}: {name} has shape {tuple(stored[name].shape)}, this run {tuple(p.shape)}")
    if train_config is not None:
        theirs = payload["train_config"]
        diff = {k: (theirs.get(k), train_config.get(k)) for k in keys if theirs.get(k) != train_config.get(k)}
        if diff:
            raise CheckpointError(f"{path} belongs to a different run; settings differ (checkpoint, run): {diff}")
