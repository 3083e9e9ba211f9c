"""Multi-task datasets (SoftCPT): several ``DatasetSplits`` as one stream of (image, label, task id).

Each task keeps its own label space (labels 0..C_t-1, as its ``DatasetSplits`` numbers them); the union of the
tasks' splits is sampled at random, so batches mix tasks in proportion to their sizes, with no task balancing
(Dassl's plain ``RandomSampler`` in kding1225/softcpt). ``global_label`` = the task's column offset + label,
i.e. the column of the class in SoftCPT's [B, sum C] logits.

>>> mt = MultiTaskDataset([("pets", pets_splits), ("cars", cars_splits)])
>>> learner = fastprompt.create_learner("softcpt", clip, mt.classnames, tasknames=mt.tasknames)
>>> for batch in mt.loader("train_x", batch_size=32, transform=tfm):
...     loss, logits = learner.compute_loss(batch["img"], batch["label"], batch["task"])
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fastprompt.datasets import build_dataset

from .base import DatasetSplits

__all__ = ["MultiTaskDatum", "MultiTaskDataset", "MultiTaskImageDataset", "general10", "GENERAL10", "GENERAL10_TASKNAMES"]

SPLITS = ("train_x", "val", "test")

# General-10 (SoftCPT): the ten CoOp datasets other than ImageNet, one task each, in the official order.
GENERAL10 = ("caltech101", "dtd", "eurosat", "fgvc_aircraft", "food101", "oxford_flowers", "oxford_pets",
             "stanford_cars", "sun397", "ucf101")
# The official task names live in per-dataset task_name.txt files that are not in the repository; these
# descriptive names are fastprompt's default (pass ``tasknames=`` to general10 to use others).
GENERAL10_TASKNAMES = {
    "caltech101": "object recognition", "dtd": "texture recognition", "eurosat": "satellite image classification",
    "fgvc_aircraft": "aircraft model recognition", "food101": "food recognition",
    "oxford_flowers": "flower recognition", "oxford_pets": "pet breed recognition",
    "stanford_cars": "car model recognition", "sun397": "scene recognition", "ucf101": "human action recognition",
}


@dataclass(frozen=True)
class MultiTaskDatum:
    impath: str
    label: int  # within its task: 0..C_t-1
    task: int  # task id: 0..T-1
    global_label: int  # task offset + label: the column in [B, sum C] logits
    classname: str = ""


class MultiTaskDataset:
    """Tasks given as ``[(task name, DatasetSplits), ...]`` -> one multi-task dataset.

    Attributes: ``tasknames`` [T], ``classnames`` (one list per task), ``offsets`` [T+1] (column ranges),
    and ``train_x`` / ``val`` / ``test`` as lists of :class:`MultiTaskDatum`.
    """

    def __init__(self, tasks: Sequence[Tuple[str, DatasetSplits]]):
        if isinstance(tasks, dict):
            tasks = list(tasks.items())
        tasks = list(tasks)
        if not tasks:
            raise ValueError("a multi-task dataset needs at least one (task name, DatasetSplits) pair")
        self.tasknames: List[str] = []
        self.classnames: List[List[str]] = []
        self.datasets: List[DatasetSplits] = []
        for i, pair in enumerate(tasks):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise TypeError(f"task {i} must be a (name, DatasetSplits) pair, got {pair!r}")
            name, splits = pair
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"task {i} needs a non-empty name, got {name!r}")
            if not isinstance(splits, DatasetSplits):
                raise TypeError(f"task {name!r}: expected a DatasetSplits, got {type(splits).__name__}")
            if name in self.tasknames:
                raise ValueError(f"task name {name!r} appears twice")
            self.tasknames.append(name)
            self.classnames.append(list(splits.classnames))
            self.datasets.append(splits)
        self.offsets = [0]
        for names in self.classnames:
            self.offsets.append(self.offsets[-1] + len(names))
        for split in SPLITS:
            setattr(self, split, self._merge(split))

    def _merge(self, split: str) -> List[MultiTaskDatum]:
        out = []
        for t, splits in enumerate(self.datasets):
            C = len(self.classnames[t])
            for d in getattr(splits, split):
                if not 0 <= d.label < C:
                    raise ValueError(f"task {self.tasknames[t]!r} ({split}): label {d.label} outside 0..{C - 1}")
                out.append(MultiTaskDatum(d.impath, int(d.label), t, self.offsets[t] + int(d.label), d.classname))
        return out

    @property
    def num_tasks(self) -> int:
        return len(self.tasknames)

    @property
    def num_classes(self) -> List[int]:
        return [len(n) for n in self.classnames]

    def learner_kwargs(self) -> Dict[str, list]:
        """``classnames`` and ``tasknames`` for ``create_learner("softcpt", clip, **mt.learner_kwargs())``."""
        return {"classnames": [list(n) for n in self.classnames], "tasknames": list(self.tasknames)}

    def items(self, split: str) -> List[MultiTaskDatum]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return getattr(self, split)

    def batches(self, split: str, batch_size: int, shuffle: bool = True, seed: Optional[int] = None,
                drop_last: bool = False) -> Iterator[List[MultiTaskDatum]]:
        """One epoch of index batches over the union of the tasks (no image loading)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        items = self.items(split)
        order = list(range(len(items)))
        if shuffle:
            random.Random(seed).shuffle(order)
        for i in range(0, len(order), batch_size):
            chunk = order[i : i + batch_size]
            if drop_last and len(chunk) < batch_size:
                break
            yield [items[j] for j in chunk]

    def loader(self, split: str, batch_size: int, transform: Optional[Callable] = None, shuffle: Optional[bool] = None,
               num_workers: int = 0, seed: Optional[int] = None, drop_last: bool = False,
               load_image: Optional[Callable] = None) -> DataLoader:
        """A DataLoader of dicts ``{"img": [B, 3, H, W], "label": [B], "task": [B], "global_label": [B],
        "impath": [B]}``; ``shuffle`` defaults to True for ``train_x`` (uniform over the union of tasks)."""
        shuffle = split == "train_x" if shuffle is None else shuffle
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        ds = MultiTaskImageDataset(self.items(split), transform, load_image)
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, generator=gen,
                          drop_last=drop_last)


class MultiTaskImageDataset(Dataset):
    """``items[i]`` -> ``{"img", "label", "task", "global_label", "impath"}`` (image decoded with PIL, then
    ``transform``; or ``load_image(path)``)."""

    def __init__(self, items: Sequence[MultiTaskDatum], transform: Optional[Callable] = None,
                 load_image: Optional[Callable] = None):
        self.items = list(items)
        self.transform, self.load_image = transform, load_image

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        d = self.items[i]
        if self.load_image is not None:
            img = self.load_image(d.impath)
        else:
            with Image.open(d.impath) as im:
                img = im.convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return {"img": img, "label": d.label, "task": d.task, "global_label": d.global_label, "impath": d.impath}


def general10(root: str, shots: int = 16, seed: int = 1, subsample: str = "all",
              tasknames: Optional[Dict[str, str]] = None, cache_dir: Optional[str] = None,
              datasets: Sequence[str] = GENERAL10) -> MultiTaskDataset:
    """General-10 (SoftCPT): the ten CoOp datasets under ``root`` (CoOp layouts), each a task, K-shot per task
    with ``seed`` and optionally the base/new class half of every task (``subsample``), through
    ``fastprompt.datasets.build_dataset``. ``tasknames`` overrides the default task names per dataset."""
    names = dict(GENERAL10_TASKNAMES)
    if tasknames:
        unknown = set(tasknames) - set(GENERAL10)
        if unknown:
            raise ValueError(f"tasknames for unknown datasets {sorted(unknown)}; General-10 has {list(GENERAL10)}")
        names.update(tasknames)
    bad = [d for d in datasets if d not in GENERAL10]
    if bad:
        raise ValueError(f"{bad} are not General-10 datasets ({list(GENERAL10)})")
    tasks = [(names[d], build_dataset(d, root, shots=shots, seed=seed, subsample=subsample, cache_dir=cache_dir))
             for d in datasets]
    return MultiTaskDataset(tasks)
