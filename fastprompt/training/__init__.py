"""Training, evaluation and reporting for every registered learner (the Dassl protocol, made resumable).

    from fastprompt.training import TrainConfig, Trainer, evaluate
    cfg = resolve_defaults(TrainConfig(method="coop", shots=16))
    Trainer(learner, train_set, cfg, output_dir="runs/x").fit()
"""
from fastprompt.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fastprompt.training.config import (
    METHOD_DEFAULTS, TrainConfig, apply_mapping, apply_opts, default_epochs, load_config_file, resolve_defaults,
)
from fastprompt.training.data import DatumDataset, EpochBatchSampler
from fastprompt.training.evaluate import evaluate, harmonic_mean, summarize_base2new, summarize_cross_dataset
from fastprompt.training.schedule import EpochLRSchedule, dassl_lr, vpt_lr
from fastprompt.training.trainer import Trainer, seed_everything

__all__ = [
    "CheckpointError", "load_checkpoint", "save_checkpoint", "METHOD_DEFAULTS", "TrainConfig", "apply_mapping",
    "apply_opts", "default_epochs", "load_config_file", "resolve_defaults", "DatumDataset", "EpochBatchSampler",
    "evaluate", "harmonic_mean", "summarize_base2new", "summarize_cross_dataset", "EpochLRSchedule", "dassl_lr", "vpt_lr",
    "Trainer", "seed_everything",
]
