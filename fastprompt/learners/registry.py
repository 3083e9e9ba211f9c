"""Learner registry: ``create_learner(name, clip_model, classnames, **config)``."""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import torch.nn as nn

from fastprompt.compiling import compile_learner

_LEARNERS: Dict[str, type] = {}


def register_learner(name: str) -> Callable[[type], type]:
    """Class decorator: make a learner reachable as ``create_learner(name, ...)``."""

    def wrap(cls: type) -> type:
        key = name.lower()
        if key in _LEARNERS:
            raise ValueError(f"learner {key!r} is already registered")
        _LEARNERS[key] = cls
        cls.method = key
        return cls

    return wrap


def unregister_learner(name: str) -> type:
    """Remove a learner from the registry (e.g. one a test registered) and return its class."""
    key = str(name).lower()
    if key not in _LEARNERS:
        raise ValueError(f"unknown learner {name!r}; available: {', '.join(list_learners())}")
    return _LEARNERS.pop(key)


def list_learners() -> List[str]:
    return sorted(_LEARNERS)


def get_learner_class(name: str) -> type:
    key = str(name).lower()
    if key not in _LEARNERS:
        raise ValueError(f"unknown learner {name!r}; available: {', '.join(list_learners())}")
    return _LEARNERS[key]


def create_learner(name: str, clip_model: nn.Module, classnames: Sequence[str], config=None, tokenizer=None,
                   compile=False, **kwargs):
    """Build a learner.

    Args:
        name: method name (``list_learners()``), e.g. "coop", "cocoop".
        clip_model: a (frozen) open_clip model, e.g. from ``fastprompt.load_clip``.
        classnames: the C class names.
        config: the method's config dataclass or a dict; ``**kwargs`` override single options.
        tokenizer: the model's tokenizer (default: open_clip's SimpleTokenizer).
        compile: run the fast text side through ``torch.compile`` (see :func:`fastprompt.compile`): True, a
            ``torch.compile`` mode, or a dict of its options.

    Returns:
        An ``nn.Module`` whose ``forward(images [B, 3, H, W])`` returns logits [B, C].
    """
    learner = get_learner_class(name)(clip_model, classnames, config=config, tokenizer=tokenizer, **kwargs)
    if compile:
        compile_learner(learner, compile)
    return learner
