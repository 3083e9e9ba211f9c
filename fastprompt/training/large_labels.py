"""Top-k evaluation over very large label spaces (ImageNet-21k: ~21,000 classes) with bounded memory.

The classes are streamed in chunks of ``chunk_classes``: only one chunk's text features (or class buffers) and
one [B, chunk] block of logits exist at a time, and a running top-k per image keeps the best classes seen so
far. Peak memory beyond the model (float32 sizes, E = embedding width, D = text width):

* text side: ``chunk_classes x E`` features, plus, when a learner encodes the chunk, its class buffers
  (CoOp-like: ``chunk_classes x 77 x D`` token embeddings and the text tower's activations for that chunk);
* logits: ``B x chunk_classes`` (B = image batch) and a ``B x (k + chunk)`` sort buffer;
* running top-k: ``N x k`` values and indices (N = number of images evaluated).

Nothing grows with the number of classes C. With the defaults (chunk 2048, E = 512, B = 100, k = 5) that is
4 MB of text features and 0.8 MB of logits per step.

Tie-breaking is fixed and the same chunked or not: larger score first, equal scores by smaller class index.
Chunks arrive in increasing class order; each chunk is reduced with a *stable* descending sort, and the merge
puts the running entries (all of smaller class index) before the chunk's and sorts stably again, so equal
scores keep the order of their class indices exactly as a stable sort of the full [B, C] row would.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import torch

__all__ = ["stable_topk", "RunningTopK", "chunked_topk", "learner_chunked_topk", "CHUNKABLE_METHODS",
           "chunk_unsupported_reason", "topk_accuracy"]


def stable_topk(scores: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """scores [B, C] -> (values [B, k'], indices [B, k']), k' = min(k, C): descending, ties by smaller index."""
    values, indices = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


class RunningTopK:
    """The top-k classes of B rows over class chunks fed in increasing class order (see the module notes).

    ``update(scores [B, c], offset)``: the scores of classes ``offset .. offset + c - 1``. ``values``/``indices``
    [B, min(k, classes seen)] hold the result."""

    def __init__(self, k: int):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = int(k)
        self.values: Optional[torch.Tensor] = None
        self.indices: Optional[torch.Tensor] = None
        self.next_class = 0

    def update(self, scores: torch.Tensor, offset: int) -> None:
        if scores.dim() != 2:
            raise ValueError(f"scores must be [B, chunk], got shape {tuple(scores.shape)}")
        if offset < self.next_class:
            raise ValueError(f"chunks must come in increasing class order: offset {offset} < {self.next_class}")
        vals, idx = stable_topk(scores, self.k)
        idx = idx + offset
        self.next_class = offset + scores.shape[1]
        if self.values is None:
            self.values, self.indices = vals, idx
            return
        # running entries first: they all have smaller class indices, so the stable sort keeps index order on ties
        vals = torch.cat([self.values, vals.to(self.values.dtype)], dim=1)
        idx = torch.cat([self.indices, idx], dim=1)
        vals, order = torch.sort(vals, dim=-1, descending=True, stable=True)
        self.values = vals[:, : self.k]
        self.indices = idx.gather(1, order[:, : self.k])


def chunked_topk(image_features: torch.Tensor, text_chunks: Iterable[torch.Tensor], logit_scale=1.0,
                 k: int = 5) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``logit_scale * image_features @ text.T`` with the text features streamed in chunks.

    Args:
        image_features: [B, E] (normalised by the caller when cosine logits are wanted).
        text_chunks: [c_i, E] blocks of consecutive classes (0..c_0-1, then c_0.., ...), e.g. a generator that
            encodes each chunk only when asked.
        logit_scale: scalar (tensor or float).
        k: how many classes to keep.
    Returns:
        (values [B, k], indices [B, k]) equal to ``stable_topk`` of the unchunked [B, C] logits.
    """
    top = RunningTopK(k)
    offset = 0
    for t in text_chunks:
        top.update(logit_scale * image_features.to(t.dtype) @ t.t(), offset)
        offset += t.shape[0]
    if top.values is None:
        raise ValueError("text_chunks yielded no classes")
    return top.values, top.indices


# Learners whose logit for class c depends only on class c's own name (and the image), so that scoring a chunk
# of classes with the learner set to that chunk gives those classes' logits. Not chunkable: CoOp with
# class-specific contexts (csc: one learned context per training class), CaPT (its attention module mixes all
# classes, and its TCI similarity matrix is over the whole list), DePT on its head's classes (the CAT head is
# [C_base, E] on a fixed list), SoftCPT (tasks), DPC (base/new heads of a fixed list).
CHUNKABLE_METHODS = ("coop", "cocoop", "kgcoop", "prograd")


def chunk_unsupported_reason(learner) -> Optional[str]:
    """None when ``learner`` can score classes chunk by chunk, else why not (one line)."""
    method = getattr(learner, "method", type(learner).__name__)
    if method not in CHUNKABLE_METHODS:
        return f"{method} cannot score a class chunk on its own (chunkable: {', '.join(CHUNKABLE_METHODS)})"
    if getattr(learner, "csc", False):
        return "coop with class-specific contexts (csc) has one learned context per training class"
    if not callable(getattr(learner, "logits_from_image_features", None)):
        return f"{method} has no logits_from_image_features"
    return None


@torch.no_grad()
def learner_chunked_topk(learner, image_features, classnames: Sequence[str], chunk_classes: int = 2048,
                         k: int = 5, batch_size: int = 100) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k classes of every image among ``classnames`` (any number), ``chunk_classes`` classes at a time.

    Args:
        learner: a chunkable learner (:data:`CHUNKABLE_METHODS`) in eval mode.
        image_features: [N, E] frozen image features as ``encode_images`` returns them (a tensor or the feature
            store's ``StoredFeatures``).
        classnames: the full label space, C names.
        chunk_classes: classes held at once (memory bound in the module notes).
        k: classes kept per image.
        batch_size: images scored at once.
    Returns:
        (values [N, k], indices [N, k]) into ``classnames``. The learner's own class list is restored after.
    """
    reason = chunk_unsupported_reason(learner)
    if reason is not None:
        raise TypeError(f"chunked evaluation: {reason}")
    if chunk_classes < 1:
        raise ValueError(f"chunk_classes must be >= 1, got {chunk_classes}")
    names = list(classnames)
    rows = image_features.rows if hasattr(image_features, "rows") else (lambda a, b: image_features[a:b])
    n = len(image_features)
    device = next(learner.parameters()).device
    tops: List[RunningTopK] = [RunningTopK(k) for _ in range(0, n, batch_size)]
    previous = list(learner.classnames)
    learner.eval()
    try:
        for start in range(0, len(names), chunk_classes):  # classes outer: each chunk's text is encoded once
            learner.set_classnames(names[start : start + chunk_classes])
            for top, a in zip(tops, range(0, n, batch_size)):
                top.update(learner.logits_from_image_features(rows(a, a + batch_size).to(device)), start)
    finally:
        learner.set_classnames(previous)
    return torch.cat([t.values for t in tops]), torch.cat([t.indices for t in tops])


def topk_accuracy(indices: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict:
    """indices [N, k] (best first), labels [N] -> {"top1": %, "top5": %} for each requested k <= indices' k."""
    labels = torch.as_tensor(labels).view(-1, 1).to(indices.device)
    hit = indices == labels
    return {f"top{j}": 100.0 * float(hit[:, :j].any(dim=1).double().mean()) for j in ks if j <= indices.shape[1]}

