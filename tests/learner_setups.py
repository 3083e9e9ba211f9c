"""Per-learner tiny setups shared by the training test (``tests/training/test_all_learners_train.py``) and the
learner-on-device equivalence test (``tests/learners/test_gpu_learners.py``).

What each learner needs beyond ``create_learner(method, clip, classnames)`` on a toy model (``tests.conftest.
tiny_clip``: 2 vision + 3 text layers, 32 px) is in ``SETUPS``: prompt depth <= the towers' layers (deep-prompt
learners), fewer tokens (speed only), ``top_k`` <= the number of classes (DPC) and the training images'
``DatasetSplits`` (DPC's hard-negative library, DAPT's prototypes, both built by ``attach_train_data``), and for
SoftCPT a multi-task class list with *global* labels (the trainer feeds ``(images, labels)`` only; SoftCPT's
``compute_loss(images, labels)`` takes global class columns when no task ids are given, so the synthetic
dataset's 4 classes are read as 2 tasks x 2 classes).
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple, Union

import torch

NUM_CLASSES = 4

# method -> (learner options, needs the DatasetSplits)
SETUPS: Dict[str, Tuple[Dict[str, Any], bool]] = {
    "coop": ({"n_ctx": 2}, False),
    "cocoop": ({"n_ctx": 2}, False),
    "kgcoop": ({}, False),
    "prograd": ({}, False),
    "dept": ({"base_config": {"n_ctx": 2}}, False),
    "capt": ({}, False),
    "decapt": ({}, False),
    "maple": ({"prompt_depth": 2}, False),
    "ivlp": ({"prompt_depth_text": 2, "prompt_depth_vision": 2}, False),
    "promptsrc": ({"n_ctx_text": 2, "n_ctx_vision": 2, "prompt_depth_text": 2, "prompt_depth_vision": 2}, False),
    # PromptKD's teacher: a PromptSRC built on the student's own toy CLIP (the real one is a trained ViT-L/14)
    "promptkd": ({"n_ctx_vision": 2, "prompt_depth_vision": 2, "teacher_clip": "student",
                  "teacher_config": {"n_ctx_text": 2, "n_ctx_vision": 2, "prompt_depth_text": 2, "prompt_depth_vision": 2}},
                 False),
    "dapt": ({"vis_num_tokens": 2, "txt_num_tokens": 2}, True),
    "dpc": ({"top_k": 2, "seed": 0, "backbone_config": {"n_ctx": 2}}, True),
    "vpt": ({"num_tokens": 2, "deep": True}, False),
    "vapt": ({"num_tokens": 2}, False),
    "softcpt": ({"tasknames": ["animals", "things"], "n_ctx": 2, "task_n_ctx": 2}, False),
}


def synthetic_splits(root: str, images_per_class: int = 5, shots: int = 2):
    """A caltech101-layout synthetic dataset of ``NUM_CLASSES`` classes under ``root`` -> its DatasetSplits."""
    from fastprompt.datasets import build_dataset, make_synthetic_dataset

    make_synthetic_dataset(str(root), "caltech101", num_classes=NUM_CLASSES, images_per_class=images_per_class)
    return build_dataset("caltech101", str(root), shots=shots, seed=1)


def learner_classnames(method: str, names: List[str]) -> Union[List[str], List[List[str]]]:
    """The class list ``create_learner`` takes: SoftCPT gets 2 tasks x 2 classes (global label c = column c)."""
    if method == "softcpt":
        half = len(names) // 2
        return [list(names[:half]), list(names[half:])]
    return list(names)


def make_learner(method: str, clip, splits, device=None, attach: bool = False, seed: int = 0):
    """``create_learner(method, clip, classnames of splits, **SETUPS[method][0])`` with the torch seed set first;
    moved to ``device`` and, when ``attach`` and the method needs it, given the training data (as the Trainer
    does: after the move)."""
    import fastprompt

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
