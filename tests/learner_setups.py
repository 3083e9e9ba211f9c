"""Per-learner tiny setups shared by the training test (``tests/training/test_all_learners_train.py``) and the
learner-on-device equivalence test (``tests/learners/test_gpu_learners.py``).

What each learner needs beyond ``create_learner(method, clip, classnames)`` on a toy model (``tests.conftest.
tiny_clip``: 2 vision + 3 text layers, 32 px) is declared on the learner class (``tiny_setup``,
``tiny_needs_data``, ``tiny_classnames``) and collected in ``SETUPS``: prompt depth <= the towers' layers (deep-prompt
learners), fewer tokens (speed only), ``top_k`` <= the number of classes (DPC) and the training images'
``DatasetSplits`` (DPC's hard-negative library, DAPT's prototypes, both built by ``attach_train_data``), and for
SoftCPT a multi-task class list with *global* labels (the trainer feeds ``(images, labels)`` only; SoftCPT's
``compute_loss(images, labels)`` takes global class columns when no task ids are given, so the synthetic
dataset's 4 classes are read as 2 tasks x 2 classes).
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple, Union

import torch

import fastprompt

NUM_CLASSES = 4


def _setups() -> Dict[str, Tuple[Dict[str, Any], bool]]:
    """method -> (learner options, needs the DatasetSplits): each learner class's ``tiny_setup`` and
    ``tiny_needs_data`` (fastprompt.learners.base.PromptLearner), for every registered learner that has one."""
    out = {}
    for method in fastprompt.list_learners():
        cls = fastprompt.get_learner_class(method)
        if cls.tiny_setup is not None:
            out[method] = (dict(cls.tiny_setup), bool(cls.tiny_needs_data))
    return out


SETUPS: Dict[str, Tuple[Dict[str, Any], bool]] = _setups()


def synthetic_splits(root: str, images_per_class: int = 5, shots: int = 2):
    """A caltech101-layout synthetic dataset of ``NUM_CLASSES`` classes under ``root`` -> its DatasetSplits."""
    from fastprompt.datasets import build_dataset, make_synthetic_dataset

    make_synthetic_dataset(str(root), "caltech101", num_classes=NUM_CLASSES, images_per_class=images_per_class)
    return build_dataset("caltech101", str(root), shots=shots, seed=1)


def learner_classnames(method: str, names: List[str]) -> Union[List[str], List[List[str]]]:
    """The class list ``create_learner`` takes (the class's ``tiny_classnames``): SoftCPT gets 2 tasks x 2 classes
    (global label c = column c)."""
    return fastprompt.get_learner_class(method).tiny_classnames(names)


def make_learner(method: str, clip, splits, device=None, attach: bool = False, seed: int = 0):
    """``create_learner(method, clip, classnames of splits, **SETUPS[method][0])`` with the torch seed set first;
    moved to ``device`` and, when ``attach`` and the method needs it, given the training data (as the Trainer
    does: after the move)."""
    if method not in SETUPS:
        raise ValueError(f"no tiny setup for learner {method!r}; known: {', '.join(sorted(SETUPS))}")
    options, needs_splits = SETUPS[method]
    torch.manual_seed(seed)
    learner = fastprompt.create_learner(method, clip, learner_classnames(method, splits.classnames), config=dict(options))
    if device is not None:
        learner = learner.to(device)
    if attach and needs_splits:
        learner.attach_train_data(splits)
    return learner
