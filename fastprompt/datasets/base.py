"""The dataset interface every part of fastprompt agrees on (datasets, trainer, DPC's image library, SoftCPT).

A dataset is a :class:`DatasetSplits`: lists of :class:`Datum` (an image path and its label) per split, the
class names indexed by label, and the dataset's hand-crafted template. Labels are contiguous ``0..C-1`` within
one ``DatasetSplits`` (after a base/new subsample they are relabelled, as Dassl does).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

__all__ = ["Datum", "DatasetSplits"]


@dataclass(frozen=True)
class Datum:
    impath: str  # absolute path of the image file
    label: int  # 0..C-1
    classname: str = ""
    domain: int = 0


@dataclass
class DatasetSplits:
    name: str  # snake-case key, e.g. "oxford_pets" (fastprompt.templates.dataset_key)
    classnames: List[str]  # indexed by label
    train_x: List[Datum] = field(default_factory=list)
    val: List[Datum] = field(default_factory=list)
    test: List[Datum] = field(default_factory=list)
    template: str = "a photo of a {}."  # the dataset's CUSTOM_TEMPLATES entry
    root: Optional[str] = None
    # For datasets whose label space is a subset of another (ImageNet-A / -R: 200 of ImageNet's 1000 classes):
    # label c here is class ``parent_classes[c]`` of the parent (ImageNet) label space. None = same label space.
    parent_classes: Optional[List[int]] = None

    @property
    def num_classes(self) -> int:
        return len(self.classnames)
