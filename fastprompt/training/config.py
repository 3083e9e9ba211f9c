"""Run configuration: official defaults per method, yacs-style ``--opts KEY VALUE`` overrides, YAML/JSON files.

A run is one :class:`TrainConfig`. Its method-specific options (``learner``) are the fields of the learner's
config dataclass (``CoOpConfig``, ...), whose defaults are the official ones; the optimisation defaults that
the official YAML files set per method (epochs, batch size, lr) are declared on each learner class
(``training_defaults``; :data:`METHOD_DEFAULTS` reads them from the registry).

Dassl users can keep their keys: ``OPTIM.LR 0.002``, ``OPTIM.MAX_EPOCH 50``, ``DATALOADER.TRAIN_X.BATCH_SIZE 4``,
``TRAINER.COOP.N_CTX 4`` (any field of the learner's config, upper-cased), ``TRAINER.COOP.PREC fp16``...
The precedence is the same as Dassl's ``setup_cfg``: defaults < config file < command-line flags < ``--opts``.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import yaml

from fastprompt.learners.dapt import DAPT_BETAS, DAPT_LR  # noqa: F401  (re-exported: the DAPT tables)
from fastprompt.learners.registry import get_learner_class, list_learners
from fastprompt.learners.vpt import VPT_SOLVER
from fastprompt.templates import dataset_key
from fastprompt.validation import check_device, check_train_numbers

__all__ = ["TrainConfig", "METHOD_DEFAULTS", "method_defaults", "PRECISIONS", "resolve_defaults", "apply_opts", "load_config_file",
           "apply_mapping", "default_epochs", "valid_keys"]

PRECISIONS = ("fp32", "fp64", "bf16", "fp16", "amp")
SCHEDULES = ("cosine", "warmup_cosine")  # fastprompt.training.schedule
SUBSAMPLES = ("all", "base", "new")

# Per-method optimisation defaults of the official configs are each learner class's ``training_defaults``.
# ``epochs=None`` means "depends on the shots" (CoOp's and DAPT's few-shot scripts, see default_epochs). Keys
# besides epochs / batch_size / lr override DASSL_OPTIM (the Dassl solver every CoOp-family config uses).
DASSL_OPTIM: Dict[str, Any] = {"weight_decay": 5e-4, "warmup_epoch": 1, "lr_scheduler": "cosine", "lr_batch_scaling": False}
VPT_REFERENCE_BATCH = 256  # VPT / VAPT: effective lr = lr * (global batch) / 256
VPT_OPTIM = VPT_SOLVER  # the VPT / VAPT solver (fastprompt.learners.vpt)


class _RegistryDefaults(Mapping):
    """{method: its learner class's ``training_defaults``} for every registered learner that declares them
    (read-only; kept for code that reads the table)."""

    def __getitem__(self, method: str) -> Dict[str, Any]:
        if method not in list_learners() or not get_learner_class(method).training_defaults:
            raise KeyError(method)
        return get_learner_class(method).training_defaults

    def __iter__(self):
        return iter([m for m in list_learners() if get_learner_class(m).training_defaults])

    def __len__(self) -> int:
        return len(list(iter(self)))


# The per-method official settings live on each learner class (``training_defaults``, ``base2new_training``).
METHOD_DEFAULTS: Mapping[str, Dict[str, Any]] = _RegistryDefaults()
GENERIC = {"epochs": 10, "batch_size": 32, "lr": 0.002}


# How a base-to-new run trains before it is tested on the base and the new classes (the CoOp protocol: 16
# shots of the base classes) unless the learner class declares otherwise (``base2new_training``).
DEFAULT_BASE2NEW = {"train_subsample": "base", "shots": 16}


def base2new_protocol(method: str) -> Dict[str, Any]:
    """``{"train_subsample", "shots"}`` of ``method``'s base-to-new training run (shots: the default when the user
    gives none)."""
    cls = get_learner_class(method) if method in list_learners() else None
    return dict(DEFAULT_BASE2NEW, **(cls.base2new_training if cls is not None else {}))


def method_defaults(method: str, dataset: str = "", subsample: str = "all") -> Dict[str, Any]:
    """The official optimisation settings of ``method`` for a run on ``dataset`` / ``subsample``: epochs
    (None = by shots), batch_size, lr, weight_decay, warmup_epoch, lr_scheduler, lr_batch_scaling, and
    ``learner`` (official per-dataset learner options, e.g. DAPT's betas)."""
    entry = dict(METHOD_DEFAULTS.get(method, GENERIC))
    key = dataset_key(dataset) if dataset else ""
    by_lr, by_learner = entry.pop("lr_by_dataset", {}), entry.pop("learner_by_dataset", {})
    b2n = entry.pop("base2new", None)
    out = dict(DASSL_OPTIM, learner={}, **entry)
    if b2n is not None and subsample in ("base", "new"):
        out.update(b2n)
    else:
        if key in by_lr:
            out["lr"] = by_lr[key]
        out["learner"] = dict(by_learner.get(key, {}))
    return out


def default_epochs(method: str, shots: int, dataset: str = "", subsample: str = "all") -> int:
    """Official epoch count: the method's table entry; CoOp (and DAPT) few-shot use 50 (1 shot, and ImageNet
    at any shots), 100 (2 and 4 shots) or 200 (8, 16 shots) epochs [CoOp COOP.md, DAPT scripts/main.sh]."""
    entry = method_defaults(method, dataset, subsample)
    if entry["epochs"] is not None:
        return int(entry["epochs"])
    if dataset.lower().replace("-", "_") == "imagenet" or shots == 1:
        return 50
    return 100 if shots in (2, 4) else 200


@dataclass
class TrainConfig:
    """Everything one training / evaluation run needs. ``None`` epochs/batch_size/lr mean "the method's
    official default" (:func:`resolve_defaults`)."""

    method: str = "coop"
    model: str = "ViT-B-16"  # open_clip name, or a path to an open_clip model-config JSON
    pretrained: Optional[str] = "openai"  # open_clip tag, a checkpoint path, or None (random weights)
    dataset: str = ""
    root: str = ""
    shots: int = 16  # -1: the full training set
    seed: int = 1
    subsample: str = "all"  # "all" | "base" | "new"
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    test_batch_size: int = 100
    lr: Optional[float] = None
    momentum: float = 0.9  # Dassl OPTIM.MOMENTUM
    weight_decay: Optional[float] = None  # OPTIM.WEIGHT_DECAY; None: the method's (Dassl 5e-4, VPT 1e-4)
    warmup_epoch: Optional[int] = None  # OPTIM.WARMUP_EPOCH; None: the method's (Dassl 1, VPT 10)
    warmup_lr: float = 1e-5  # Dassl's constant warm-up lr (unused by "warmup_cosine")
    warmup_type: str = "constant"
    lr_scheduler: Optional[str] = None  # "cosine" (Dassl) | "warmup_cosine" (VPT); None: the method's
    lr_batch_scaling: Optional[bool] = None  # train at lr * global batch / 256 (VPT); None: the method's
    precision: str = "fp32"
    grad_clip: Optional[float] = None  # max grad norm; None = off, as the official code
    num_workers: int = min(4, os.cpu_count() or 1)  # more workers than cores only slows down (and warns)
    device: str = "auto"
    output_dir: str = "output"
    class_sharding: bool = False  # multi-process only: each rank encodes a slice of the classes
    progress: bool = True
    print_freq: Optional[int] = None  # TRAIN.PRINT_FREQ: also a line every N batches (None: per epoch only)
    tensorboard: Optional[str] = None  # a directory: TensorBoard scalars per epoch (needs the tensorboard package)
    learner: Dict[str, Any] = field(default_factory=dict)  # the learner config's fields

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {sorted(unknown)}; fields: {sorted(names)}")
        return cls(**data)

    def validate(self) -> "TrainConfig":
        if self.method not in list_learners():
            raise ValueError(f"unknown method {self.method!r}; available: {', '.join(list_learners())}")
        check_train_numbers(self)  # types, finiteness and ranges, named by their CLI option
        check_device(self.device)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.subsample not in SUBSAMPLES:
            raise ValueError(f"subsample must be one of {SUBSAMPLES}, got {self.subsample!r}")
        if self.shots == 0 or self.shots < -1:
            raise ValueError(f"shots must be -1 (all) or >= 1, got {self.shots}")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_scheduler is not None and self.lr_scheduler not in SCHEDULES:
            raise ValueError(f"lr_scheduler must be one of {SCHEDULES}, got {self.lr_scheduler!r}")
        if self.warmup_epoch is not None and self.warmup_epoch < 0:
            raise ValueError(f"warmup_epoch must be >= 0, got {self.warmup_epoch}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        learner_fields = _learner_fields(self.method)
        unknown = set(self.learner) - set(learner_fields)
        if unknown:
            raise ValueError(f"{self.method} has no option(s) {sorted(unknown)}; options: {sorted(learner_fields)}")
        get_learner_class(self.method).config_class.build(dict(self.learner))  # type / range checks
        return self


def resolve_defaults(cfg: TrainConfig) -> TrainConfig:
    """Fill the fields left at None (epochs, batch_size, lr, weight_decay, warmup_epoch, lr_scheduler,
    lr_batch_scaling) with the method's official values for this dataset / protocol, and add the official
    per-dataset learner options the run does not set itself (DAPT's betas). Idempotent."""
    entry = method_defaults(cfg.method, cfg.dataset, cfg.subsample)
    filled = {name: getattr(cfg, name) if getattr(cfg, name) is not None else entry[name]
              for name in ("batch_size", "lr", "weight_decay", "warmup_epoch", "lr_scheduler", "lr_batch_scaling")}
    filled["epochs"] = cfg.epochs if cfg.epochs is not None else default_epochs(cfg.method, cfg.shots, cfg.dataset,
                                                                                  cfg.subsample)
    learner = dict(entry["learner"])
    learner.update(cfg.learner)
    return dataclasses.replace(cfg, learner=learner, **filled)


def _learner_fields(method: str) -> Dict[str, dataclasses.Field]:
    config_class = get_learner_class(method).config_class
    return {f.name: f for f in dataclasses.fields(config_class)}


# Dassl keys -> TrainConfig fields.
_DASSL_KEYS = {
    "OPTIM.LR": "lr", "OPTIM.MAX_EPOCH": "epochs", "OPTIM.MOMENTUM": "momentum",
    "OPTIM.WEIGHT_DECAY": "weight_decay", "OPTIM.WARMUP_EPOCH": "warmup_epoch", "OPTIM.WARMUP_CONS_LR": "warmup_lr",
    "OPTIM.WARMUP_TYPE": "warmup_type", "OPTIM.MAX_GRAD_NORM": "grad_clip",
    "DATALOADER.TRAIN_X.BATCH_SIZE": "batch_size", "DATALOADER.TEST.BATCH_SIZE": "test_batch_size",
    "DATALOADER.NUM_WORKERS": "num_workers", "DATASET.NAME": "dataset", "DATASET.ROOT": "root",
    "DATASET.NUM_SHOTS": "shots", "DATASET.SUBSAMPLE_CLASSES": "subsample", "SEED": "seed",
    "OUTPUT_DIR": "output_dir", "MODEL.BACKBONE.NAME": "model", "TRAINER.NAME": "method",
    "OPTIM.LR_SCHEDULER": "lr_scheduler", "TRAIN.PRINT_FREQ": "print_freq",
    # VPT / VAPT (fvcore) names of the same settings
    "SOLVER.BASE_LR": "lr", "SOLVER.TOTAL_EPOCH": "epochs", "SOLVER.WARMUP_EPOCH": "warmup_epoch",
    "SOLVER.WEIGHT_DECAY": "weight_decay", "SOLVER.MOMENTUM": "momentum", "DATA.BATCH_SIZE": "batch_size",
    "SOLVER.SCHEDULER": "lr_scheduler",
}
# Dassl keys whose only accepted value is what fastprompt implements (so configs that set them still load).
_FIXED_KEYS = {"OPTIM.NAME": ("sgd",), "SOLVER.OPTIMIZER": ("sgd",), "OPTIM.WARMUP_RECOUNT": (True,),
               "TEST.FINAL_MODEL": ("last_step",)}
_PREC = {"fp16": "fp16", "fp32": "fp32", "amp": "amp", "bf16": "bf16", "fp64": "fp64"}


def valid_keys(method: str) -> List[str]:
    """Every key --opts accepts for ``method``."""
    trainer = f"TRAINER.{method.upper()}."
    keys = list(_DASSL_KEYS) + list(_FIXED_KEYS) + [trainer + "PREC"]
    keys += [trainer + name.upper() for name in _learner_fields(method)]
    keys += [f.name for f in dataclasses.fields(TrainConfig) if f.name != "learner"]
    return sorted(keys)


def _parse_value(text: Any) -> Any:
    """yacs semantics: a literal when it parses as one (numbers, booleans, lists), else the string."""
    if not isinstance(text, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        lowered = text.lower()
        if lowered in ("none", "null"):
            return None
        if lowered in ("true", "false"):
            return lowered == "true"
        return text


def _coerce(value: Any, default: Any, key: str) -> Any:
    """Cast ``value`` to the type of the field's ``default`` (int/float/bool/str) with a clear error."""
    if value is None or default is None:
        return value
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"{key} expects true/false, got {value!r}")
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{key} expects a number, got {value!r}")
        if kind is int and float(value) != int(value):
            raise TypeError(f"{key} expects an integer, got {value!r}")
        return kind(value)
    if kind is str:
        return value if isinstance(value, str) else str(value)
    return value


_FIELD_DEFAULTS = {f.name: (f.default if f.default is not dataclasses.MISSING else None)
                   for f in dataclasses.fields(TrainConfig)}
_NUMERIC_OPTIONAL = {"epochs": 1, "batch_size": 1, "lr": 1.0, "grad_clip": 1.0, "pretrained": "", "weight_decay": 1.0,
                     "warmup_epoch": 1, "lr_scheduler": "", "lr_batch_scaling": False, "print_freq": 1}


def _set(cfg: TrainConfig, key: str, raw: Any) -> TrainConfig:
    value = _parse_value(raw)
    upper = key.upper()
    if upper in _FIXED_KEYS:
        allowed = _FIXED_KEYS[upper]
        if (value.lower() if isinstance(value, str) else value) not in allowed:
            raise ValueError(f"{key}={value!r} is not supported; fastprompt implements {allowed}")
        return cfg
    field_name = _DASSL_KEYS.get(upper)
    if field_name is None and key in _FIELD_DEFAULTS and key != "learner":
        field_name = key
    if field_name is not None:
        default = _FIELD_DEFAULTS[field_name]
        default = _NUMERIC_OPTIONAL.get(field_name, default) if default is None else default
        if field_name == "model" and isinstance(value, str):
            value = value.replace("/", "-") if not os.path.exists(value) else value
        if field_name in ("method", "subsample") and isinstance(value, str):
            value = value.lower()
        return dataclasses.replace(cfg, **{field_name: _coerce(value, default, key)})
    trainer = f"TRAINER.{cfg.method.upper()}."
    if upper.startswith(trainer):
        option = upper[len(trainer):].lower()
        if option == "prec":
            if str(value).lower() not in _PREC:
                raise ValueError(f"{key} must be one of {sorted(_PREC)}, got {value!r}")
            return dataclasses.replace(cfg, precision=_PREC[str(value).lower()])
        fields = _learner_fields(cfg.method)
        if option in fields:
            f = fields[option]
            default = f.default if f.default is not dataclasses.MISSING else None
            learner = dict(cfg.learner)
            learner[option] = _coerce(value, default, key)
            return dataclasses.replace(cfg, learner=learner)
    raise ValueError(f"unknown option {key!r} for method {cfg.method!r}; valid keys: {', '.join(valid_keys(cfg.method))}")


def apply_opts(cfg: TrainConfig, opts: Sequence[str]) -> TrainConfig:
    """Apply a yacs-style flat list ``[KEY, VALUE, KEY, VALUE, ...]``."""
    opts = list(opts or [])
    if len(opts) % 2:
        raise ValueError(f"--opts needs KEY VALUE pairs, got an odd number of items: {opts}")
    # TRAINER.NAME first, so TRAINER.<METHOD>.* keys of the same list resolve against the right method.
    pairs = [(opts[i], opts[i + 1]) for i in range(0, len(opts), 2)]
    pairs.sort(key=lambda kv: kv[0].upper() not in ("TRAINER.NAME", "METHOD"))
    for key, value in pairs:
        cfg = _set(cfg, key, value)
    return cfg


def _flatten(data: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key != "learner":
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def apply_mapping(cfg: TrainConfig, data: Dict[str, Any]) -> TrainConfig:
    """Apply a (nested, yacs-shaped or flat) mapping: ``{"OPTIM": {"LR": 0.002}, "shots": 4, "learner": {...}}``."""
    flat = _flatten(data)
    learner = flat.pop("learner", None)
    method = flat.pop("TRAINER.NAME", flat.pop("method", None))
    if method is not None:
        cfg = _set(cfg, "method", method)
    for key, value in flat.items():
        cfg = _set(cfg, key, value)
    if learner is not None:
        if not isinstance(learner, dict):
            raise TypeError(f"'learner' must be a mapping of {cfg.method} options, got {learner!r}")
        for key, value in learner.items():
            cfg = _set(cfg, f"TRAINER.{cfg.method.upper()}.{key.upper()}", value)
    return cfg


def load_config_file(path: str) -> Dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON config file into a mapping."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML ({exc})") from exc
    elif path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    else:
        raise ValueError(f"config file {path!r} must end in .yaml, .yml or .json")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data
