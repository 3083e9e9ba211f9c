"""Data plumbing of the trainer: reproducible batch order, image datasets over ``Datum`` lists, transforms.

Batch order. Dassl shuffles with a ``RandomSampler`` driven by the global torch RNG, so the order of epoch e
depends on everything drawn before it. Here each epoch's permutation is a pure function of (seed, epoch):
a run resumed at epoch k draws exactly the batches the uninterrupted run drew, and ``world_size`` processes
together draw exactly the global batches one process would (rank r takes rows [r*b, (r+1)*b) of every global
batch of size world_size*b; DistributedSampler semantics with a global order that does not depend on the
number of processes).
"""
from __future__ import annotations

from typing import Callable, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torchvision import transforms as T

from fastprompt.datasets import clip_transforms
from fastprompt.datasets.images import load_rgb

__all__ = ["epoch_seed", "EpochBatchSampler", "DatumDataset", "train_transform", "test_transform", "collate"]


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed derived from (seed, epoch) by NumPy's SeedSequence (well mixed, platform independent)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF]).generate_state(2, np.uint64)[0] >> 1)


class EpochBatchSampler(Sampler[List[int]]):
    """Batches of dataset indices for one rank; call :meth:`set_epoch` before iterating each epoch.

    Args:
        n: dataset size.
        batch_size: images per step *per process* (the global batch is batch_size * world_size).
        seed: run seed; the permutation of epoch e is ``randperm(n)`` under ``epoch_seed(seed, e)``.
        shuffle: False for evaluation (sequential order).
        drop_last: drop an incomplete final global batch. Dassl's train loader drops it when
            ``len(data) >= batch_size`` (so a tiny dataset still yields one short batch); pass None for that rule.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: Optional[bool] = None,
                 rank: int = 0, world_size: int = 1):
        if n < 1:
            raise ValueError(f"the dataset is empty (n={n})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        global_batch = batch_size * world_size
        self.drop_last = (n >= global_batch) if drop_last is None else drop_last
        if world_size > 1 and n < global_batch:
            raise ValueError(f"{n} training images cannot fill one global batch of {global_batch} "
                             f"({world_size} processes x {batch_size}); lower the batch size")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self) -> torch.Tensor:
        """[n] the global index order of the current epoch."""
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return torch.randperm(self.n, generator=g)

    def __len__(self) -> int:
        gb = self.batch_size * self.world_size
        return self.n // gb if self.drop_last else -(-self.n // gb)

    def __iter__(self) -> Iterator[List[int]]:
        order = self.order().tolist()
        gb = self.batch_size * self.world_size
        for step in range(len(self)):
            global_batch = order[step * gb : (step + 1) * gb]
            mine = global_batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            if mine:
                yield mine


class DatumDataset(Dataset):
    """``Datum`` items (image path + label) -> ``(image tensor [3, H, W], label)`` through ``transform``."""

    def __init__(self, items: Sequence, transform: Callable):
        self.items, self.transform = list(items), transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        return self.transform(load_rgb(item.impath)), int(item.label)  # ImageDecodeError names a bad file


def collate(batch):
    """(images [B, 3, H, W], labels [B]) from tuples or Dassl-style dicts ({"img", "label"})."""
    if isinstance(batch[0], dict):
        return torch.stack([b["img"] for b in batch]), torch.as_tensor([int(b["label"]) for b in batch])
    images, labels = zip(*batch)
    return torch.stack(images), torch.as_tensor([int(y) for y in labels])


def _mean_std_size(model):
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    mean = cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))  # CLIP's, as the CoOp configs set
    std = cfg.get("std", (0.26862954, 0.26130258, 0.27577711))
    size = getattr(model.visual, "image_size", 224)
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return mean, std, size


def train_transform(model, preprocess=None):
    """Dassl's CoOp training transform: random_resized_crop (scale 0.08-1, bicubic) + random_flip + normalize.

    Uses ``fastprompt.datasets.clip_transforms`` when the dataset layer provides it."""
    try:
        return clip_transforms(preprocess if preprocess is not None else _mean_std_size(model)[2][0], train=True)
    except (ImportError, AttributeError, TypeError):
        pass
    mean, std, size = _mean_std_size(model)
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std),
    ])


def test_transform(model, preprocess=None):
    """Resize the short side, centre-crop, normalize (open_clip's preprocess = Dassl's test transform)."""
    if preprocess is not None:
        return preprocess
    mean, std, size = _mean_std_size(model)
    return T.Compose([T.Resize(size[0], interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(mean, std)])
