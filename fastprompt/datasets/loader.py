"""Image decoding in DataLoader workers, and Dassl's CLIP transforms (as the CoOp-family configs set them)."""
from __future__ import annotations

import random
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset

from .base import Datum
from .images import load_rgb

__all__ = ["ImageDataset", "build_loader", "clip_transforms", "CLIP_MEAN", "CLIP_STD"]

# OpenAI CLIP's normalisation (Dassl INPUT.PIXEL_MEAN / PIXEL_STD in every CoOp-family config).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageDataset(Dataset):
    """``items[i]`` -> ``(transform(RGB PIL image), label)``; decoding happens in whichever process indexes it."""

    def __init__(self, items: Sequence[Datum], transform: Optional[Callable] = None):
        if not all(isinstance(it, Datum) for it in items):
            bad = next(it for it in items if not isinstance(it, Datum))
            raise TypeError(f"ImageDataset expects Datum items, got {type(bad).__name__}: {bad!r}")
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Tuple[object, int]:
        item = self.items[i]
        img = load_rgb(item.impath)  # Dassl's read_image: PIL, converted to RGB; a bad file is named
        if self.transform is not None:
            img = self.transform(img)
        return img, item.label


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker's torch RNG from the loader's generator; give python `random` and numpy (used by
    # some third-party transforms) the same per-worker seed so augmentations are reproducible for a given seed.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def build_loader(items: Sequence[Datum], transform: Optional[Callable], batch_size: int, shuffle: bool = False,
                 drop_last: bool = False, num_workers: int = 4, seed: Optional[int] = 0,
                 pin_memory: Optional[bool] = None) -> DataLoader:
    """A DataLoader over ``ImageDataset(items, transform)`` yielding ``(images [B, 3, H, W], labels [B])``.

    Images decode in ``num_workers`` worker processes (0 = in the main process); the shuffle order and the
    workers' augmentation seeds come from a generator seeded with ``seed`` (None = unseeded); memory is pinned
    when CUDA is available unless ``pin_memory`` says otherwise.
    """
    for arg, val, lo in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise TypeError(f"{arg} must be an int, got {val!r}")
        if val < lo:
            raise ValueError(f"{arg} must be >= {lo}, got {val}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    generator = None
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(seed)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return DataLoader(ImageDataset(items, transform), batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, pin_memory=pin_memory, generator=generator,
                      worker_init_fn=_seed_worker if num_workers > 0 else None,
                      persistent_workers=num_workers > 0)


def _params_from_preprocess(preprocess) -> Tuple[int, object, Tuple[float, ...], Tuple[float, ...]]:
    """(size, interpolation, mean, std) read off an open_clip / torchvision ``Compose``."""
    size, interp, mean, std = None, T.InterpolationMode.BICUBIC, CLIP_MEAN, CLIP_STD
    for t in getattr(preprocess, "transforms", []):
        if isinstance(t, T.CenterCrop):
            size = t.size[0] if isinstance(t.size, (tuple, list)) else t.size
        elif isinstance(t, (T.Resize, T.RandomResizedCrop)):
            interp = t.interpolation
            if size is None:
                s = t.size
                size = s if isinstance(s, int) else s[0]
        elif isinstance(t, T.Normalize):
            mean, std = tuple(t.mean), tuple(t.std)
    if size is None:
        raise ValueError(f"cannot find an image size (Resize / CenterCrop) in {preprocess!r}")
    return int(size), interp, tuple(float(m) for m in mean), tuple(float(s) for s in std)


def clip_transforms(preprocess_or_size: Union[int, Callable], train: bool, scale=(0.08, 1.0)):
    """Dassl's transforms as the CoOp-family configs set them (``INPUT.TRANSFORMS``, bicubic, CLIP mean/std).

    train: ``RandomResizedCrop(size, scale=(0.08, 1))`` -> ``RandomHorizontalFlip`` -> ``ToTensor`` -> normalise.
    test:  ``Resize(size)`` (shorter side) -> ``CenterCrop(size)`` -> ``ToTensor`` -> normalise.
    ``preprocess_or_size`` is an image size (CLIP mean/std) or an open_clip preprocess whose size,
    interpolation and mean/std are reused (so a model with other statistics gets its own).
    """
    if isinstance(preprocess_or_size, bool):
        raise TypeError(f"expected an image size or a preprocess transform, got {preprocess_or_size!r}")
    if isinstance(preprocess_or_size, int):
        if preprocess_or_size < 1:
            raise ValueError(f"image size must be >= 1, got {preprocess_or_size}")
        size, interp, mean, std = preprocess_or_size, T.InterpolationMode.BICUBIC, CLIP_MEAN, CLIP_STD
    elif callable(preprocess_or_size):
        size, interp, mean, std = _params_from_preprocess(preprocess_or_size)
    else:
        raise TypeError(f"expected an image size or a preprocess transform, got {preprocess_or_size!r}")
    norm = T.Normalize(mean, std)
    if train:
        return T.Compose([T.RandomResizedCrop(size, scale=tuple(scale), interpolation=interp),
                          T.RandomHorizontalFlip(), T.ToTensor(), norm])
    return T.Compose([T.Resize(size, interpolation=interp), T.CenterCrop(size), T.ToTensor(), norm])
