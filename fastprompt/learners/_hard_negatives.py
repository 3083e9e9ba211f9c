"""DPC's Dynamic Hard Negative Optimizer pieces: the miner and the pre-indexed image library.

The miner is the official per-sample loop (JREion/DPC ``parse_sple_batch_train``), written as a pure function
over a score matrix so that it can be tested on hand-built scores:

1. candidates of sample i = top-K classes of its scores, ground truth removed, in rank order
   (K-1 candidates when the ground truth is in the top-K, K otherwise);
2. non-repeat: a candidate is kept only if no earlier sample of the batch (nor any ground-truth label of the
   batch) already uses it; a kept candidate joins that "seen" list;
3. fallback: with fewer than 2 survivors, up to ``C - 2`` random draws ``randint(lo, hi)`` (CoOp: 1..C-2,
   so class 0 is never drawn) top the list up to 2 with labels not seen yet; it may still end with fewer.

The image library replaces the official JSON file that is re-opened and parsed for every sample: it is indexed
once (class -> images) and, by default, holds only the few-shot training images the learner is given.
"""
from __future__ import annotations

import random
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
from PIL import Image
from torchvision import transforms as T

__all__ = ["mine_hard_negatives", "ImageLibrary", "default_train_transform", "FALLBACK_RANGES"]

# Inclusive range of the random fallback draw, as a function of the number of classes C.
FALLBACK_RANGES = {
    "coop": lambda C: (1, C - 2),  # sple_coop.py: randint(1, n_cls - 2)
    "promptkd": lambda C: (1, C - 1),  # sple_promptkd.py: randint(1, n_cls - 1)
}


def mine_hard_negatives(
    scores: torch.Tensor,
    labels: torch.Tensor,
    top_k: int,
    rng: Optional[random.Random] = None,
    fallback: str = "coop",
    after_sample: Optional[Callable[[int, List[int]], None]] = None,
) -> List[List[int]]:
    """Hard-negative classes of every sample of a batch.

    Args:
        scores: [B, C] backbone class scores (softmax probabilities or logits: only their order matters).
        labels: [B] int ground-truth classes.
        top_k: K, the number of top-scored classes each sample considers (1 <= K <= C).
        rng: the random source of the fallback draws (default: a fresh ``random.Random()``).
        fallback: "coop" (draws 1..C-2) or "promptkd" (draws 1..C-1).
        after_sample: called as ``after_sample(i, negatives_i)`` once sample i is mined, before sample i+1
            (DPC draws the negative images there, so the random stream interleaves as in the official loop).

    Returns:
        B lists of class indices (python ints), in the order the official loop appends them.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must be a [B, C] tensor, got {getattr(scores, 'shape', type(scores).__name__)}")
    B, C = scores.shape
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != B:
        raise ValueError(f"labels must be [B={B}], got shape {tuple(labels.shape)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    if top_k > C:
        raise ValueError(
            f"top_k={top_k} is larger than the number of training classes ({C}); the official sampler's "
            f"topk would crash here (e.g. EuroSAT has 5 base classes): choose top_k <= {C}"
        )
    if fallback not in FALLBACK_RANGES:
        raise ValueError(f"fallback must be one of {sorted(FALLBACK_RANGES)}, got {fallback!r}")
    gts = [int(v) for v in labels.tolist()]
    bad = [v for v in gts if not 0 <= v < C]
    if bad:
        raise ValueError(f"labels must lie in 0..{C - 1}, got {bad}")
    rng = rng if rng is not None else random.Random()
    lo, hi = FALLBACK_RANGES[fallback](C)
    top = scores.detach().topk(top_k, dim=-1).indices.tolist()  # rank order, best first
    seen = list(gts)  # every ground truth of the batch counts as used from the start
    out = []
    for gt, ranked in zip(gts, top):
        negatives = []
        for c in ranked:
            if c != gt and c not in seen:
                negatives.append(c)
                seen.append(c)
        if len(negatives) < 2:
            # The official bounded loop: draw first, then keep the label if it is new; one extra draw happens
            # after the list is full (before the break), which keeps the random stream in step with it.
            for _ in range(C - 2):
                c = rng.randint(lo, hi)
                if c not in seen and len(negatives) < 2:
                    negatives.append(c)
                    seen.append(c)
                elif len(negatives) >= 2:
                    break
        out.append(negatives)
        if after_sample is not None:
            after_sample(len(out) - 1, negatives)
    return out


# ---------------------------------------------------------------------- images
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def default_train_transform(size: int):
    """Dassl's CLIP training transform (random resized crop, bicubic, scale 0.08-1; flip; CLIP normalisation),
    which the CoOp+DPC sampler applies to the negative images. PIL image -> [3, size, size] float tensor."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(_CLIP_MEAN, _CLIP_STD),
    ])


def _pil_loader(path: str):
    with Image.open(path) as img:
        return img.convert("RGB")


class ImageLibrary:
    """Per-class images to draw hard negatives from, indexed once.

    Items are image paths (loaded with ``load_image(path)`` or PIL, then ``transform``) or in-memory
    [3, H, W] tensors (returned as they are).
    """

    def __init__(self, items: Mapping[int, Sequence], transform: Optional[Callable] = None,
                 load_image: Optional[Callable[[str], object]] = None):
        self.items: Dict[int, list] = {}
        for label, entries in items.items():
            entries = list(entries)
            if entries:
                self.items[int(label)] = entries
        self.transform = transform
        self.load_image = load_image

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_dataset(cls, dataset, transform=None, load_image=None, split: str = "train_x") -> "ImageLibrary":
        """Index ``dataset.<split>`` (a :class:`~fastprompt.datasets.base.DatasetSplits`; default the
        few-shot training set) by label: {label: [image paths]}."""
        data = getattr(dataset, split, None)
        if data is None:
            raise TypeError(f"dataset must be a DatasetSplits with a {split!r} list, got {type(dataset).__name__}")
        items: Dict[int, list] = {}
        for datum in data:
            items.setdefault(int(datum.label), []).append(datum.impath)
        if not items:
            raise ValueError(f"dataset {getattr(dataset, 'name', '?')!r} has no {split} images to index")
        return cls(items, transform, load_image)

    @classmethod
    def from_tensors(cls, tensors) -> "ImageLibrary":
        """{label: [N, 3, H, W] tensor or a list of [3, H, W] tensors} (or a list indexed by label)."""
        if isinstance(tensors, Mapping):
            pairs = tensors.items()
        elif isinstance(tensors, Sequence):
            pairs = enumerate(tensors)
        else:
            raise TypeError(f"tensors must be a dict or list of image tensors per class, got {type(tensors).__name__}")
        items = {}
        for label, images in pairs:
            images = list(images)
            for img in images:
                if not isinstance(img, torch.Tensor) or img.dim() != 3:
                    raise ValueError(f"class {label}: library images must be [3, H, W] tensors")
            items[int(label)] = images
        return cls(items)

    # ------------------------------------------------------------------ sampling
    def __contains__(self, label: int) -> bool:
        return int(label) in self.items

    def __len__(self) -> int:
        return sum(len(v) for v in self.items.values())

    @property
    def labels(self) -> List[int]:
        return sorted(self.items)

    def load(self, item) -> torch.Tensor:
        """One library entry -> [3, H, W] tensor."""
        if isinstance(item, torch.Tensor):
            return item
        img = (self.load_image or _pil_loader)(item)
        if self.transform is not None:
            img = self.transform(img)
        if not isinstance(img, torch.Tensor):
            raise TypeError(
                f"loading {item!r} gave a {type(img).__name__}, not a tensor: give the library a transform "
                "(e.g. fastprompt.learners._hard_negatives.default_train_transform(224)) or a load_image that "
                "returns tensors"
            )
        return img

    def sample(self, labels: Sequence[int], rng: random.Random) -> List[torch.Tensor]:
        """One random image per label (``rng.choice`` of the class's entries, as the official sampler)."""
        out = []
        for label in labels:
            entries = self.items.get(int(label))
            if not entries:
                raise ValueError(
                    f"class {label} has no image in the hard-negative library (it indexes classes {self.labels[:20]}"
                    f"{'...' if len(self.items) > 20 else ''}); every training class needs at least one image"
                )
            out.append(self.load(rng.choice(entries)))
        return out
