"""What a training run shows and logs besides ``log.jsonl``: one line per epoch kept on screen (the progress bar
of an epoch is transient) with an ETA for the whole run, optional TensorBoard scalars, and run configs whose
paths resolve from any directory."""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Dict, Optional



def format_duration(seconds: float) -> str:
    """3725 -> "1h02m", 185 -> "3m05s", 9.4 -> "9s"."""
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


class RunsETA:
    """ETA of a sequence of runs (a sweep, base-to-new): mean seconds of the runs trained so far x runs left."""

    def __init__(self, total: int):
        self.total, self.trained, self.seconds = int(total), 0, 0.0

    def add(self, seconds: float) -> None:
        self.trained += 1
        self.seconds += float(seconds)

    def text(self, left: int) -> str:
        if not self.trained or left <= 0:
            return ""
        return f", ETA of the rest {format_duration(self.seconds / self.trained * left)}"


def require_tensorboard():
    """torch's SummaryWriter; ImportError with the install line when the optional package is absent."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional dependency (tensorboard)
    except ImportError:
        raise ImportError("--tensorboard needs the tensorboard package: pip install 'fastprompt[tensorboard]' "
                          "(or pip install tensorboard)") from None
    return SummaryWriter


def tensorboard_dir(root: str, cfg) -> str:
    """One TensorBoard run per training run: ``<root>/<method>_<dataset>_<subsample>_shots<k>_seed<s>``."""
    return os.path.join(root, f"{cfg.method}_{cfg.dataset or 'data'}_{cfg.subsample}_shots{cfg.shots}_seed{cfg.seed}")


class EpochReporter:
    """Prints one line per finished epoch (loss, train accuracy, lr, throughput, time, ETA of the whole run)
    and writes the same scalars to TensorBoard when a directory is given."""

    def __init__(self, epochs: int, start_epoch: int, show: bool, tensorboard: Optional[str] = None, stream=None):
        self.epochs, self.start, self.show = int(epochs), int(start_epoch), bool(show)
        self.stream = stream or sys.stdout
        self.seconds = 0.0
        self.done = 0
        self.writer = require_tensorboard()(log_dir=tensorboard) if tensorboard else None

    def epoch_done(self, record: Dict[str, Any]) -> str:
        """``record``: the trainer's epoch log entry. Returns the printed line."""
        self.seconds += float(record.get("seconds", 0.0))
        self.done += 1
        left = self.epochs - record["epoch"]
        eta = self.seconds / self.done * left
        acc = record.get("train_acc")
        lr = record.get("lr") or [float("nan")]
        line = (f"epoch {record['epoch']}/{self.epochs}  loss {record['loss']:.4f}"
                + (f"  acc {acc:.1f}%" if acc is not None else "")
                + f"  lr {lr[0]:.2e}  {record.get('img_per_s', 0):.1f} img/s  {format_duration(record.get('seconds', 0))}"
                + (f"  ETA {format_duration(eta)}" if left > 0 else "  done"))
        if self.show:
            print(line, file=self.stream, flush=True)
        if self.writer is not None:
            step = record["epoch"]
            self.writer.add_scalar("train/loss", record["loss"], step)
            if acc is not None:
                self.writer.add_scalar("train/accuracy", acc, step)
            for i, value in enumerate(lr):
                self.writer.add_scalar(f"train/lr_group{i}", value, step)
            self.writer.add_scalar("train/img_per_s", record.get("img_per_s", 0.0), step)
            self.writer.flush()
        return line

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def absolute_paths(cfg):
    """``cfg`` with its filesystem paths absolute (datasets root, output directory, a model-config JSON, a
    checkpoint given as --pretrained), so the run_config.json it is saved as works from any directory."""
    def full(path):  # "~/data" from a config file (no shell expanded it) is the home folder's data/
        return os.path.abspath(os.path.expanduser(path))

    changes = {}
    if cfg.root:
        changes["root"] = full(cfg.root)
    if cfg.output_dir:
        changes["output_dir"] = full(cfg.output_dir)
    if cfg.model and cfg.model.endswith(".json") and os.path.exists(os.path.expanduser(cfg.model)):
        changes["model"] = full(cfg.model)
    if cfg.pretrained and os.path.exists(os.path.expanduser(str(cfg.pretrained))):
        changes["pretrained"] = full(cfg.pretrained)
    if getattr(cfg, "tensorboard", None):
        changes["tensorboard"] = full(cfg.tensorboard)
    return dataclasses.replace(cfg, **changes)
