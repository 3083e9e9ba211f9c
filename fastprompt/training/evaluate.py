"""Evaluation: accuracy on a split, and the base-to-new / cross-dataset summaries the papers report.

Text features are computed once per split: learners cache image-independent text features in eval mode under
``no_grad`` (``PromptLearner.cached_text_features``), where the official code re-encodes every class for every
test batch of 100.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from fastprompt.training.data import EpochBatchSampler, collate
from fastprompt.training.trainer import autocast_dtype

__all__ = ["evaluate", "harmonic_mean", "summarize_base2new", "summarize_cross_dataset"]


@torch.no_grad()
def evaluate(learner, dataset, batch_size: int = 100, device: str | torch.device = "cpu", precision: str = "fp32",
             num_workers: int = 0, progress: bool = False, desc: str = "eval", image_features=None) -> Dict[str, Any]:
    """Top-1 accuracy of ``learner`` on ``dataset`` (map-style, ``(image, label)`` items), in percent.

    ``image_features``: the dataset's stored frozen image features (a ``StoredFeatures`` or [N, E] tensor, row i
    = ``learner.encode_images`` of image i, computed in these same batches) for a learner that declares
    ``image_features_frozen``: the images are then not read, and each batch's logits are
    ``learner.logits_from_image_features(rows)``, bit-equal to ``learner(images)``.

    Returns:
        {"accuracy": top-1 %, "macro_accuracy": mean of per-class accuracies % (the metric of datasets whose
        protocol averages over classes), "correct", "total", "num_classes", "seconds", "img_per_s"}.
    """
    device = torch.device(device)
    C = len(learner.classnames)
    sampler = EpochBatchSampler(len(dataset), batch_size, shuffle=False, drop_last=False)
    if image_features is not None:
        loader = _feature_batches(image_features, dataset, sampler)
    else:
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                             collate_fn=collate, pin_memory=device.type == "cuda")
    learner.eval()
    amp = autocast_dtype(precision)
    hits = torch.zeros(C, dtype=torch.long)
    counts = torch.zeros(C, dtype=torch.long)
    bar = None
    if progress:
        bar = tqdm(total=len(sampler), desc=desc, leave=False, dynamic_ncols=True)
    t0 = time.perf_counter()
    for images, labels in loader:
        if int(labels.max()) >= C or int(labels.min()) < 0:
            raise ValueError(f"label {int(labels.max())} outside the learner's {C} classes; did set_classnames run?")
        ctx = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
        with ctx:
            if image_features is not None:
                logits = learner.logits_from_image_features(images.to(device, non_blocking=True))
            else:
                logits = learner(images.to(device, non_blocking=True))
        pred = logits.argmax(-1).cpu()
        counts += torch.bincount(labels, minlength=C)
        hits += torch.bincount(labels[pred == labels], minlength=C)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    total, correct = int(counts.sum()), int(hits.sum())
    present = counts > 0
    per_class = hits[present].double() / counts[present].double()
    return {
        "accuracy": 100.0 * correct / max(total, 1),
        "macro_accuracy": 100.0 * float(per_class.mean()) if bool(present.any()) else 0.0,
        "correct": correct, "total": total, "num_classes": C,
        "seconds": round(seconds, 4), "img_per_s": round(total / max(seconds, 1e-9), 2),
    }


def _feature_batches(features, dataset, sampler):
    """(feature rows [b, E], labels [b]) in the sampler's sequential batches; labels from ``dataset.items``."""
    if len(features) != len(dataset):
        raise ValueError(f"{len(features)} stored image features for a dataset of {len(dataset)} images")
    labels = torch.as_tensor([int(item.label) for item in dataset.items])
    rows = features.rows if hasattr(features, "rows") else (lambda a, b: features[a:b])
    for batch in sampler:
        a, b = batch[0], batch[-1] + 1  # sequential batches: a contiguous row range
        yield rows(a, b), labels[a:b]


def harmonic_mean(base: float, new: float) -> float:
    """H = 2BN / (B + N) (0 when both are 0)."""
    return 0.0 if base + new == 0 else 2.0 * base * new / (base + new)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def summarize_base2new(runs: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per-dataset rows and the "Average" row from per-seed runs ``{"dataset", "seed", "base", "new"}``.

    Each dataset's B and N are the means over its seeds and H = HM(B, N); the average row takes the mean B and
    mean N over datasets and H = HM(mean B, mean N), as the papers compute it, not the mean of H.
    """
    if not runs:
        raise ValueError("no base-to-new runs to summarize")
    datasets: Dict[str, List[Dict[str, Any]]] = {}
    for run in runs:
        datasets.setdefault(run["dataset"], []).append(run)
    rows = []
    for name, items in datasets.items():
        b, n = _mean([r["base"] for r in items]), _mean([r["new"] for r in items])
        rows.append({"dataset": name, "base": b, "new": n, "hm": harmonic_mean(b, n),
                     "seeds": sorted(r["seed"] for r in items)})
    if len(rows) > 1:
        b, n = _mean([r["base"] for r in rows]), _mean([r["new"] for r in rows])
        rows.append({"dataset": "Average", "base": b, "new": n, "hm": harmonic_mean(b, n), "seeds": []})
    return rows


def summarize_cross_dataset(results: Sequence[Dict[str, Any]], source: Optional[str] = None) -> List[Dict[str, Any]]:
    """Rows ``{"dataset", "accuracy"}`` (seed-averaged) plus "Average" = plain mean over the targets other
    than ``source`` (the cross-dataset "Avg" of the papers)."""
    per: Dict[str, List[float]] = {}
    for r in results:
        per.setdefault(r["dataset"], []).append(float(r["accuracy"]))
    rows = [{"dataset": d, "accuracy": _mean(v), "seeds": len(v)} for d, v in per.items()]
    targets = [r["accuracy"] for r in rows if r["dataset"] != source]
    if len(rows) > 1 and targets:
        rows.append({"dataset": "Average", "accuracy": _mean(targets), "seeds": 0})
    return rows
