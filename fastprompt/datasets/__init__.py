"""Datasets in the CoOp layouts, Dassl's few-shot protocol, base/new splits, loaders and synthetic data.

>>> splits = build_dataset("caltech101", "~/data", shots=16, seed=1, subsample="base")
>>> splits.classnames, splits.template, len(splits.train_x)

``build_dataset`` reads the full split, draws the K-shot subsets exactly as Dassl does for ``seed`` (optionally
cached under ``cache_dir``), then applies the base/new class split, in the official order.
"""
from __future__ import annotations

import os
from typing import List, Optional

from .base import DatasetSplits, Datum
from .fewshot import (base_new_split, check_shots, few_shot_splits, load_or_sample_few_shot, sample_few_shot,
                      subsample_classes)
from .layouts import SPECS, get_spec
from .layouts import find_problems as _find_problems
from .loader import CLIP_MEAN, CLIP_STD, ImageDataset, build_loader, clip_transforms
from .synthetic import SYNTHETIC_LAYOUTS, make_synthetic_dataset

__all__ = [
    "Datum", "DatasetSplits", "build_dataset", "list_datasets", "check_dataset", "dataset_description",
    "make_synthetic_dataset", "SYNTHETIC_LAYOUTS", "base_new_split", "sample_few_shot", "few_shot_splits",
    "subsample_classes", "ImageDataset", "build_loader", "clip_transforms", "CLIP_MEAN", "CLIP_STD",
]


_FAMILIES = {
    # root = the data root holding every dataset's folder (Dassl's DATASET.ROOT)
    "coop": [k for k, s in SPECS.items() if s.dataset_dir],
    # root = the dataset's own folder
    "vpt": ["vtab", "fgvc_json", "cub", "nabirds", "stanford_dogs"],
    "folder": ["imagefolder"],
}


def list_datasets(family: Optional[str] = None) -> List[str]:
    """Names accepted by :func:`build_dataset`, sorted: ``family="coop"`` the 11 CoOp datasets and the ImageNet DG
    targets (their ``root`` is a data root holding each dataset's folder), ``"vpt"`` VTAB-1k and VPT's FGVC
    json layouts and ``"folder"`` ImageFolder (their ``root`` is the dataset folder itself); None = all."""
    if family is None:
        return sorted(SPECS)
    if family not in _FAMILIES:
        raise ValueError(f"unknown dataset family {family!r}; choose from {sorted(_FAMILIES)} or None")
    return sorted(_FAMILIES[family])


def dataset_description(name: str) -> str:
    """One line on what ``name`` is and where its files live relative to ``root``."""
    spec = get_spec(name)
    where = spec.dataset_dir or "<root>"
    files = ", ".join(spec.requires) if spec.requires else "train/ val/ test/"
    return f"{spec.description}; {where}/ with {files}"


def check_dataset(name: str, root: str) -> List[str]:
    """Problems preventing ``build_dataset(name, root)``: missing folders/split files (with the expected path),
    unreadable split files, and image files the splits list but the disk lacks. ``[]`` means ready."""
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a path, got {root!r}")
    return _find_problems(get_spec(name), os.fspath(root))


def _cache_path(spec, root: str, cache_dir: Optional[str], shots: int, seed: int, repeat: bool) -> Optional[str]:
    if cache_dir is None:
        return None
    key = spec.name
    if not spec.dataset_dir:  # imagefolder / vtab / fgvc: the root *is* the dataset, so tell datasets apart
        key = f"{spec.name}-{os.path.basename(os.path.normpath(os.path.abspath(root)))}"
    suffix = "-repeat" if repeat else ""
    return os.path.join(os.path.expanduser(os.fspath(cache_dir)), key, "split_fewshot",
                        f"shot_{shots}-seed_{seed}{suffix}.json")


def build_dataset(name: str, root: str, shots: int = -1, seed: int = 1, subsample: str = "all",
                  cache_dir: Optional[str] = None, repeat: bool = False) -> DatasetSplits:
    """Load dataset ``name`` from ``root`` with the CoOp protocol.

    shots: -1 = all training images, K >= 1 = K per class for train and ``min(K, 4)`` for val (ImageNet: train
    only, its val is the test set; DG targets: no sampling), drawn as Dassl does after ``random.seed(seed)``
    (classes with fewer than K images keep them all, or are drawn with replacement when ``repeat=True``).
    subsample: "all" | "base" | "new", applied *after* sampling (first ceil(n/2) sorted labels are base; both
    halves relabelled from 0). cache_dir: if given, subsets are cached as
    ``cache_dir/<dataset>/split_fewshot/shot_{K}-seed_{S}.json`` (written atomically; ignored if the source split
    changed). Returns a :class:`DatasetSplits` with absolute image paths, class names and the dataset's template.
    """
    spec = get_spec(name)
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a path, got {root!r}")
    root = os.fspath(root)
    shots = check_shots(shots)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if subsample not in ("all", "base", "new"):
        raise ValueError(f"subsample must be 'all', 'base' or 'new', got {subsample!r}")
    splits = spec.reader(spec, root)
    if shots >= 1 and spec.few_shot != "none":
        sample_val = spec.few_shot == "train_val"
        train, val = load_or_sample_few_shot(splits.train_x, splits.val, shots, seed, splits.root,
                                             _cache_path(spec, root, cache_dir, shots, seed, repeat),
                                             sample_val=sample_val, repeat=repeat)
        splits.train_x = train
        if sample_val:
            splits.val = val
    return base_new_split(splits, subsample)
