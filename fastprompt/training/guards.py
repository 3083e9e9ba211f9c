"""Run-time guards of the training loop: stop on divergence, and augmentation randomness per sample.

Divergence. A non-finite loss or trainable tensor (``--lr 1e30``, an fp16 overflow) makes every later step
meaningless. :func:`check_finite` runs once per epoch, after the epoch's loss is summed and before the epoch's
checkpoint is written, and raises :class:`TrainingDiverged`: the last good checkpoint stays on disk, and no
adapter or results are written as if the run had succeeded.

Per-sample randomness. Random augmentation used to draw from the RNG of whichever process decoded the image
(the main process with ``num_workers=0``, worker k otherwise, each seeded differently), so the same run gave
other augmentations with another ``--num-workers``, and a run resumed with another worker count was not exact.
:class:`PerSampleSeeded` instead seeds torch, NumPy and ``random`` from (run seed, epoch, sample index) around
each ``dataset[i]`` call (restoring the caller's RNG state afterwards): every image gets the same augmentation
whatever process decodes it, and the main process's RNG stream (dropout, ...) no longer depends on the loader.
"""
from __future__ import annotations

import collections
import contextlib
import math
import random
import warnings
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from fastprompt.datasets.images import ImageDecodeError, check_images

__all__ = ["TrainingDiverged", "check_finite", "precheck_data", "sample_seed", "sample_rng", "PerSampleSeeded",
           "EpochTaggedSampler"]


class TrainingDiverged(RuntimeError):
    """The loss or a trainable tensor became NaN / infinite."""


def check_finite(loss_sum: float, named: Sequence[Tuple[str, torch.Tensor]], epoch: int, lr: float,
                 checkpoint: Optional[str] = None) -> None:
    """Raise :class:`TrainingDiverged` unless the epoch's summed loss and every tensor of ``named`` ((name,
    trainable tensor) pairs) are finite. ``epoch`` is 0-based; ``checkpoint`` is the path of the last good
    checkpoint (None: no checkpoints). One host read per epoch."""
    bad_params: List[str] = []
    if named:
        ok = torch.stack([torch.isfinite(p.detach()).all() for _, p in named])
        if not bool(ok.all()):
            bad_params = [n for (n, _), good in zip(named, ok.tolist()) if not good]
    if math.isfinite(loss_sum) and not bad_params:
        return
    what = f"the loss is {loss_sum}" if not math.isfinite(loss_sum) else f"{', '.join(bad_params)} became non-finite"
    kept = (f"the last good checkpoint {checkpoint} (after epoch {epoch}) is kept" if checkpoint and epoch > 0
            else "no checkpoint was written")
    raise TrainingDiverged(f"training diverged in epoch {epoch + 1}: {what} (lr {lr:.3g}); {kept} and no adapter "
                           "or results were written; start again with a lower --lr")


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed from (run seed, epoch, sample index) by NumPy's SeedSequence (platform independent)."""
    words = [int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, int(index) & 0xFFFFFFFF]
    return int(np.random.SeedSequence(words).generate_state(2, np.uint64)[0] >> 1)


@contextlib.contextmanager
def sample_rng(seed: int) -> Iterator[None]:
    """Seed torch (CPU), NumPy and ``random`` with ``seed`` inside the block; restore their states after it."""
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)


class PerSampleSeeded(Dataset):
    """``dataset`` indexed by ``(epoch, i)``: ``dataset[i]`` under :func:`sample_rng` of (seed, epoch, i)."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]):
        epoch, index = key
        with sample_rng(sample_seed(self.seed, epoch, index)):
            return self.dataset[index]


class EpochTaggedSampler(Sampler):
    """The batches of a batch sampler with ``set_epoch`` (``EpochBatchSampler``), each index ``i`` as
    ``(epoch, i)`` for :class:`PerSampleSeeded`."""

    def __init__(self, batch_sampler):
        self.batch_sampler = batch_sampler

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        epoch = self.batch_sampler.epoch
        for batch in self.batch_sampler:
            yield [(epoch, i) for i in batch]


def precheck_data(splits, parts: Sequence[str] = ("train_x", "test")) -> None:
    """Before training: warn about classes without a training image, and check that every image of ``parts``
    has a readable header (:class:`~fastprompt.datasets.images.ImageDecodeError` naming the bad files).

    Only headers are read (a zero-byte file, a non-image or a damaged header is caught; a JPEG truncated in its
    pixel data is caught when it is decoded, with the same error naming it): decoding a whole test set costs
    minutes, a header check a few seconds; ``fastprompt datasets`` decodes everything."""
    if "train_x" in parts and splits.train_x:
        counts = collections.Counter(d.label for d in splits.train_x)
        empty = [splits.classnames[c] for c in range(len(splits.classnames)) if counts[c] == 0]
        if empty:
            shown = ", ".join(repr(n) for n in empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
            warnings.warn(f"{len(empty)} class(es) of {splits.name} have no training image and are trained only "
                          f"through the shared prompt: {shown}", stacklevel=2)
    paths = [d.impath for part in parts for d in getattr(splits, part)]
    bad = check_images(paths, decode=False)
    if bad:
        shown = "; ".join(f"{p} ({why})" for p, why in bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ImageDecodeError(f"{len(bad)} unreadable image(s) in {splits.name}: {shown}; fix or remove them "
                               "(fastprompt datasets --root ... checks every image)")
