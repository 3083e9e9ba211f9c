"""Input checks shared by the library and the CLI: each failure is one line naming the option and what is allowed.

* :func:`check_config_fields`: a learner config dataclass (``CoOpConfig``, ...): ints are non-negative integers
  (not booleans, not floats), floats are finite non-negative numbers, booleans are booleans, strings strings;
  ``n_ctx`` is at least 1 unless ``ctx_init`` sets the context.
* :func:`check_train_numbers`: the numeric fields of a ``TrainConfig`` (``--lr``, ``--epochs``, ...).
* :func:`check_device`: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
* :func:`check_ctx_init`: a word initialisation of the context, words separated by single spaces.
* :func:`check_unique_classnames`: class names that would get identical prompts (equal after ``_`` -> space,
  case and whitespace) are an error, except the duplicates of a class list fastprompt ships (ImageNet's official
  list names "missile" and "sunglasses" twice; the official protocol keeps them, so do we, with a warning).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
import re
import warnings
from typing import Any, Dict, FrozenSet, List, Sequence

__all__ = ["check_config_fields", "check_train_numbers", "check_device", "check_ctx_init", "check_unique_classnames",
           "normalized_classname"]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_number(name: str, value: Any, integer: bool = False, minimum: float = 0.0, strict: bool = False) -> None:
    """``value`` is a finite number (an integer when ``integer``) >= ``minimum`` (> when ``strict``)."""
    kind = "an integer" if integer else "a number"
    if not _is_number(value) or (integer and not isinstance(value, int)):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum:g}, got {value!r}")


def check_config_fields(config: Any) -> Any:
    """Check every field of a learner config dataclass against the type of its default (see module doc)."""
    cls = type(config)
    for f in dataclasses.fields(config):
        default = f.default
        if default is dataclasses.MISSING or default is None:
            continue
        value = getattr(config, f.name)
        label = f"{cls.__name__}.{f.name}"
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{label} must be true or false, got {value!r}")
        elif isinstance(default, int):
            check_number(label, value, integer=True)
        elif isinstance(default, float):
            check_number(label, value)
        elif isinstance(default, str) and not isinstance(value, str):
            raise ValueError(f"{label} must be a string, got {value!r}")
    names = {f.name for f in dataclasses.fields(config)}
    if "n_ctx" in names and not getattr(config, "ctx_init", "") and getattr(config, "n_ctx") < 1:
        raise ValueError(f"{cls.__name__}.n_ctx must be >= 1 (or set ctx_init), got {config.n_ctx!r}")
    if getattr(config, "ctx_init", None):
        check_ctx_init(config.ctx_init, f"{cls.__name__}.ctx_init")
    return config


def check_ctx_init(text: str, label: str = "ctx_init") -> str:
    """A context initialisation phrase: words separated by single spaces (``_`` counts as a space, as in CoOp,
    which takes the number of context vectors from ``text.split(" ")``: an empty word would be a wrong count)."""
    phrase = text.replace("_", " ").strip()
    if "" in phrase.split(" "):
        raise ValueError(f"{label} {text!r} has empty words (repeated spaces or underscores); "
                         "separate its words by single spaces")
    return phrase


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device(device: Any) -> str:
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")
    return device


def check_train_numbers(cfg: Any) -> None:
    """The numeric fields of a TrainConfig: finite, right type, in range (named by their CLI option)."""
    checks = [  # field, CLI option, integer, minimum, strict
        ("epochs", "--epochs / OPTIM.MAX_EPOCH", True, 1, False),
        ("batch_size", "--batch-size / DATALOADER.TRAIN_X.BATCH_SIZE", True, 1, False),
        ("test_batch_size", "--test-batch-size / DATALOADER.TEST.BATCH_SIZE", True, 1, False),
        ("lr", "--lr / OPTIM.LR", False, 0, True),
        ("momentum", "momentum (OPTIM.MOMENTUM)", False, 0, False),
        ("weight_decay", "weight_decay (OPTIM.WEIGHT_DECAY)", False, 0, False),
        ("warmup_epoch", "warmup_epoch (OPTIM.WARMUP_EPOCH)", True, 0, False),
        ("warmup_lr", "warmup_lr (OPTIM.WARMUP_CONS_LR)", False, 0, False),
        ("grad_clip", "grad_clip (OPTIM.MAX_GRAD_NORM)", False, 0, True),
        ("num_workers", "--num-workers", True, 0, False), ("seed", "--seed", True, 0, False),
        ("shots", "--shots", True, -1, False),
    ]
    for name, option, integer, minimum, strict in checks:
        value = getattr(cfg, name, None)
        if value is not None:
            check_number(option, value, integer=integer, minimum=minimum, strict=strict)
    if getattr(cfg, "shots", None) == 0:
        raise ValueError("--shots / DATASET.NUM_SHOTS must be -1 (all images) or >= 1, got 0")
    if cfg.momentum >= 1:
        raise ValueError(f"momentum (OPTIM.MOMENTUM) must be < 1, got {cfg.momentum!r}")


def normalized_classname(name: str) -> str:
    """What the text encoder sees of a class name: ``_`` -> space, whitespace collapsed, lower case (the
    CLIP tokenizer lower-cases)."""
    return " ".join(name.replace("_", " ").split()).lower()


@functools.lru_cache(maxsize=1)
def _shipped_duplicates() -> FrozenSet[str]:
    """Normalised names that a class list shipped with fastprompt itself repeats (ImageNet's)."""
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "datasets", "classnames")
    out = set()
    try:
        files = os.listdir(folder)
    except OSError:
        return frozenset()
    for fname in files:
        with open(os.path.join(folder, fname), encoding="utf-8") as f:
            names = [normalized_classname(line) for line in f if line.strip()]
        out.update(n for n, k in collections.Counter(names).items() if k > 1)
    return frozenset(out)


def check_unique_classnames(classnames: Sequence[str]) -> None:
    """ValueError naming the classes whose names are equal once normalised (they would get identical logits)."""
    groups: Dict[str, List[int]] = collections.defaultdict(list)
    for i, name in enumerate(classnames):
        groups[normalized_classname(name)].append(i)
    dups = {n: idx for n, idx in groups.items() if len(idx) > 1}
    if not dups:
        return
    official = {n: idx for n, idx in dups.items() if n in _shipped_duplicates()}
    rest = {n: idx for n, idx in dups.items() if n not in official}
    if rest:
        shown = "; ".join(f"{n!r} (classes {idx})" for n, idx in list(rest.items())[:10])
        raise ValueError(f"duplicate class names would get identical prompts and logits: {shown}; give each class "
                         "a distinct name (names are compared after '_' -> space, ignoring case and extra spaces)")
    warnings.warn("class names " + ", ".join(repr(n) for n in official) + " occur more than once, as in the official "
                  "class list that fastprompt ships; those classes get identical logits (official protocol)",
                  stacklevel=3)
