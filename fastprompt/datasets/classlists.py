"""Class-name lists of the 11 standard datasets, shipped with the package (``classnames/<dataset>.txt``, one name
per line)."""
from __future__ import annotations

import os
from typing import List

__all__ = ["list_classname_sets", "load_classnames"]

_DIR = os.path.join(os.path.dirname(__file__), "classnames")


def list_classname_sets() -> List[str]:
    """Names of the shipped class lists, e.g. ``["caltech101", ..., "imagenet", ...]``."""
    return sorted(f[:-4] for f in os.listdir(_DIR) if f.endswith(".txt"))


def load_classnames(dataset: str) -> List[str]:
    """The class names of ``dataset`` (see :func:`list_classname_sets`)."""
    path = os.path.join(_DIR, f"{dataset}.txt")
    if not os.path.isfile(path):
        raise ValueError(f"no shipped class list {dataset!r}; available: {', '.join(list_classname_sets())}")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]
