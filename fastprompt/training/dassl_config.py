"""The official repositories' YAML files, as they are: ``--config-file`` (trainer) and ``--dataset-config-file``.

Dassl's ``train.py`` merges the dataset file, then the trainer file, then the command line, then ``--opts``;
fastprompt does the same. A key that means something here is honoured (``OPTIM.*``, ``DATALOADER.*.BATCH_SIZE``,
``DATASET.NAME/NUM_SHOTS/SUBSAMPLE_CLASSES``, ``TRAIN.PRINT_FREQ``, ``TRAINER.<METHOD>.*`` options of the learner, ``PREC``, ...); a key
whose value is what fastprompt does anyway is checked (``INPUT.TRANSFORMS``, ``INPUT.INTERPOLATION``, the CLIP
pixel mean / std; ``INPUT.SIZE`` is accepted: the official code asserts it equals the CLIP's resolution, and
fastprompt always feeds the model its own); every other key (``TEST.*``, ``TRAIN.CHECKPOINT_FREQ``, ...) is ignored,
and all of them are listed in ONE warning.

``PREC fp16`` means the whole model in fp16 officially (weights, activations and the learned prompts, no loss
scaling). fastprompt runs fp32 weights under fp16 autocast with a GradScaler instead (fp32 master copies of the
prompts); the warning says so.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Tuple

from fastprompt.templates import dataset_key
from fastprompt.training.config import TrainConfig, _flatten, _set, load_config_file  # the --opts machinery

# What fastprompt's data pipeline does: Dassl's CoOp transforms with bicubic interpolation.
DEFAULT_TRANSFORMS = ["random_resized_crop", "random_flip", "normalize"]
CHECKED = {
    "INPUT.TRANSFORMS": lambda v: [str(t).lower() for t in v] == DEFAULT_TRANSFORMS,
    "INPUT.INTERPOLATION": lambda v: str(v).lower() == "bicubic",
    "INPUT.PIXEL_MEAN": lambda v: [round(float(x), 4) for x in v] == [0.4815, 0.4578, 0.4082],
    "INPUT.PIXEL_STD": lambda v: [round(float(x), 4) for x in v] == [0.2686, 0.2613, 0.2758],
    "OPTIM.LR_SCHEDULER": lambda v: str(v).lower() == "cosine",
}
# Official trainer section names that differ from the fastprompt method name.
TRAINER_ALIASES = {"kgcoop": ("COOP",), "prograd": ("COOP",), "softcpt": ("MTCOOP",), "capt": ("UCP",),
                   "decapt": ("UCP",), "dpc": ("SPLE",)}


def _dataset_name(value: Any) -> str:
    return dataset_key(str(value))


def apply_official(cfg: TrainConfig, data: Dict[str, Any], source: str = "config") -> Tuple[TrainConfig, List[str], List[str]]:
    """Apply one official YAML mapping. Returns (config, ignored keys, notes); warns nothing itself."""
    flat = _flatten(data)
    ignored, notes = [], []
    if "TRAINER.NAME" in flat:  # the YAML's trainer, if it names one (the scripts pass it on the command line)
        try:
            cfg = _set(cfg, "method", str(flat.pop("TRAINER.NAME")).lower())
        except ValueError:
            ignored.append("TRAINER.NAME")
    section = f"TRAINER.{cfg.method.upper()}."
    aliases = [f"TRAINER.{a}." for a in TRAINER_ALIASES.get(cfg.method, ())]
    for key, value in flat.items():
        upper = key.upper()
        if upper in CHECKED:
            if not CHECKED[upper](value):
                ignored.append(f"{key}={value!r} (fastprompt uses the CoOp default)")
            continue
        if upper == "INPUT.SIZE":
            # The official code asserts INPUT.SIZE == the CLIP's resolution; fastprompt always feeds the
            # model its own resolution, so the key is honoured whenever the official run would start.
            continue
        if upper == "DATASET.NAME":
            value = _dataset_name(value)
        for alias in aliases:
            if upper.startswith(alias):
                key = section + upper[len(alias):]
                upper = key
        if upper.endswith(".PREC") and upper.startswith("TRAINER.") and str(value).lower() == "fp16":
            notes.append(f"{key} fp16: the official code runs the whole model in fp16; fastprompt runs fp32 weights "
                         "under fp16 autocast with a GradScaler (fp32 master prompts)")
            key = section + "PREC"
        try:
            cfg = _set(cfg, key, value)
        except ValueError:
            ignored.append(key)
    return cfg, ignored, notes


def apply_official_files(cfg: TrainConfig, dataset_config_file: str = None, config_file: str = None) -> TrainConfig:
    """Merge ``dataset_config_file`` then ``config_file`` (Dassl's order) into ``cfg``; one warning lists every
    key that was ignored and what runs instead of ``PREC fp16``."""
    ignored, notes = [], []
    for path in (dataset_config_file, config_file):
        if path:
            cfg, ign, nts = apply_official(cfg, load_config_file(path), path)
            ignored += [f"{k} ({path})" for k in ign]
            notes += nts
    if ignored or any("fp16" in n for n in notes):
        parts = []
        if ignored:
            parts.append(f"ignored {len(ignored)} key(s) that have no effect in fastprompt: " + ", ".join(ignored))
        parts += [n for n in notes if "fp16" in n]
        warnings.warn("official config: " + "; ".join(parts), UserWarning, stacklevel=2)
    return cfg
