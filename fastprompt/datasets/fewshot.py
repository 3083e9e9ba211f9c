"""Few-shot sampling and the base/new class split, reproducing Dassl / CoOp exactly.

Dassl's ``generate_fewshot_dataset`` draws from Python's *global* ``random`` module, which the official
``train.py`` seeds (``set_random_seed(cfg.SEED)``) before the trainer builds its dataset. With the official
``split_zhou_*.json`` present nothing else consumes that stream first, so the few-shot train set is the first
draw after ``random.seed(seed)`` and the val set (``min(K, 4)`` shots) the second. A private
``random.Random(seed)`` produces exactly the same stream as the seeded module-level functions (they are bound
methods of one hidden ``Random`` instance), so we reproduce the official subsets without touching the caller's
global random state.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import tempfile
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple, Union

from .base import DatasetSplits, Datum

__all__ = ["sample_few_shot", "few_shot_splits", "subsample_classes", "base_new_split", "check_shots",
           "load_or_sample_few_shot"]

SUBSAMPLE_CHOICES = ("all", "base", "new")


def check_shots(shots) -> int:
    """Validate a shot count: ``-1`` means "all images", any ``K >= 1`` means K per class."""
    if isinstance(shots, bool) or not isinstance(shots, int):
        raise TypeError(f"shots must be an int (-1 for all images, or K >= 1), got {shots!r}")
    if shots != -1 and shots < 1:
        raise ValueError(f"shots must be -1 (all images) or >= 1, got {shots}")
    return shots


def _split_by_label(items: Sequence[Datum]) -> Dict[int, List[Datum]]:
    # Dassl's split_dataset_by_label: a defaultdict filled in item order, so classes are visited in order of
    # their first appearance in the list (not sorted by label). The sampling order depends on this.
    out: Dict[int, List[Datum]] = defaultdict(list)
    for item in items:
        out[item.label].append(item)
    return out


def sample_few_shot(items: Sequence[Datum], shots: int, rng: Union[random.Random, int],
                    repeat: bool = False) -> List[Datum]:
    """K items per class, drawn as Dassl's ``generate_fewshot_dataset`` draws them.

    items: [N] Datum; shots: K (``-1`` returns ``list(items)`` unchanged); rng: a ``random.Random`` (consumed:
    pass the same one on to sample the next split) or an int seed. Classes are visited in order of first
    appearance; a class with ``>= K`` items gets ``rng.sample(items, K)``; a class with fewer keeps all its items
    in list order, or with ``repeat=True`` gets ``rng.choices(items, k=K)`` (with replacement), as in Dassl.
    Returns [<= C*K] Datum, grouped by class.
    """
    shots = check_shots(shots)
    if isinstance(rng, bool) or not isinstance(rng, (random.Random, int)):
        raise TypeError(f"rng must be a random.Random or an int seed, got {rng!r}")
    if isinstance(rng, int):
        rng = random.Random(rng)
    if shots == -1:
        return list(items)
    out: List[Datum] = []
    for _, group in _split_by_label(items).items():
        if len(group) >= shots:
            out.extend(rng.sample(group, shots))
        elif repeat:
            out.extend(rng.choices(group, k=shots))
        else:
            out.extend(group)
    return out


def few_shot_splits(train: Sequence[Datum], val: Sequence[Datum], shots: int, seed: int,
                    sample_val: bool = True, repeat: bool = False) -> Tuple[List[Datum], List[Datum]]:
    """The official order: ``random.seed(seed)``; K-shot train; then ``min(K, 4)``-shot val from the same stream.

    With ``sample_val=False`` (ImageNet: its val split is the test set) val is returned unchanged.
    """
    shots = check_shots(shots)
    if shots == -1:
        return list(train), list(val)
    rng = random.Random(seed)
    train_k = sample_few_shot(train, shots, rng, repeat=repeat)
    val_k = sample_few_shot(val, min(shots, 4), rng, repeat=repeat) if sample_val else list(val)
    return train_k, val_k


def subsample_classes(*lists: Sequence[Datum], subsample: str = "all") -> Tuple[List[int], List[List[Datum]]]:
    """CoOp's ``subsample_classes``: the labels of the first list, sorted; base = the first ``ceil(n/2)``, new = the
    rest; every list is filtered to the selected labels and relabelled ``0..`` in sorted order.

    Returns ``(selected original labels, filtered lists)``; with ``subsample="all"`` lists are returned as is.
    """
    if subsample not in SUBSAMPLE_CHOICES:
        raise ValueError(f"subsample must be one of {SUBSAMPLE_CHOICES}, got {subsample!r}")
    labels = sorted({item.label for item in lists[0]}) if lists else []
    if subsample == "all":
        return labels, [list(lst) for lst in lists]
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabel = {y: i for i, y in enumerate(selected)}
    out = [[dataclasses.replace(it, label=relabel[it.label]) for it in lst if it.label in relabel] for lst in lists]
    return selected, out


def base_new_split(splits: DatasetSplits, subsample: str = "all") -> DatasetSplits:
    """The base-to-new protocol on a whole dataset: the class set comes from ``train_x`` (from ``test`` when a
    dataset has no train split), and train/val/test are filtered and relabelled alike; ``classnames`` (and
    ``parent_classes``) are subset to match. ``"all"`` returns ``splits`` unchanged."""
    if not isinstance(splits, DatasetSplits):
        raise TypeError(f"base_new_split expects a DatasetSplits, got {type(splits).__name__}")
    if subsample not in SUBSAMPLE_CHOICES:
        raise ValueError(f"subsample must be one of {SUBSAMPLE_CHOICES}, got {subsample!r}")
    if subsample == "all":
        return splits
    first = splits.train_x if splits.train_x else splits.test
    selected, (_, train, val, test) = subsample_classes(first, splits.train_x, splits.val, splits.test,
                                                        subsample=subsample)
    parent = None if splits.parent_classes is None else [splits.parent_classes[y] for y in selected]
    return dataclasses.replace(splits, classnames=[splits.classnames[y] for y in selected], train_x=train,
                               val=val, test=test, parent_classes=parent)


# ---- cache ------------------------------------------------------------------------------------------------------

def _fingerprint(root: str, *lists: Sequence[Datum]) -> str:
    """A hash of the full (unsampled) lists: a cached subset is reused only for the very same source split."""
    h = hashlib.sha1()
    for lst in lists:
        for it in lst:
            h.update(f"{os.path.relpath(it.impath, root)}\t{it.label}\n".encode())
        h.update(b"--\n")
    return h.hexdigest()


def _encode(items: Sequence[Datum], root: str) -> list:
    return [[os.path.relpath(it.impath, root), it.label, it.classname] for it in items]


def _decode(rows: list, root: str) -> List[Datum]:
    return [Datum(impath=os.path.normpath(os.path.join(root, p)), label=int(y), classname=c) for p, y, c in rows]


def _atomic_write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f)
        os.replace(tmp, path)  # atomic on POSIX: concurrent runs never see a half-written file
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_or_sample_few_shot(train: Sequence[Datum], val: Sequence[Datum], shots: int, seed: int, root: str,
                            cache_path: Optional[str] = None, sample_val: bool = True,
                            repeat: bool = False) -> Tuple[List[Datum], List[Datum]]:
    """:func:`few_shot_splits`, cached as JSON at ``cache_path`` (CoOp's ``split_fewshot/shot_{K}-seed_{S}``).

    Image paths are stored relative to ``root`` (the dataset folder) so a cache survives moving the data. A
    cache whose source fingerprint differs from the current full split is ignored and rewritten.
    """
    if cache_path is None:
        return few_shot_splits(train, val, shots, seed, sample_val=sample_val, repeat=repeat)
    fp = _fingerprint(root, train, val)
    if os.path.isfile(cache_path):
        try:
            with open(cache_path, encoding="utf-8") as f:
                data = json.load(f)
            if data.get("source") == fp and data.get("repeat", False) == repeat:
                val_k = list(val) if data["val"] is None else _decode(data["val"], root)
                return _decode(data["train"], root), val_k
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable or foreign cache: resample and overwrite it
    train_k, val_k = few_shot_splits(train, val, shots, seed, sample_val=sample_val, repeat=repeat)
    _atomic_write_json(cache_path, {"format": 1, "shots": shots, "seed": seed, "repeat": repeat, "source": fp,
                                    "train": _encode(train_k, root),
                                    # unsampled val (ImageNet's 50k test images) is not worth storing
                                    "val": _encode(val_k, root) if sample_val else None})
    return train_k, val_k
