"""Few-shot sampling == Dassl's generate_fewshot_dataset after random.seed(seed), and its cache."""
from __future__ import annotations

import json
import os
import random

import pytest

from fastprompt.datasets import Datum, build_dataset, few_shot_splits, make_synthetic_dataset, sample_few_shot

# Labels interleaved on purpose: Dassl visits classes in order of first appearance (2, 0, 1), not sorted.
NAMES = [("a0", 2), ("b0", 0), ("a1", 2), ("c0", 1), ("b1", 0), ("a2", 2), ("b2", 0), ("c1", 1), ("a3", 2), ("b3", 0)]
ITEMS = [Datum(impath=f"/x/{n}.jpg", label=y, classname=f"class{y}") for n, y in NAMES]


def dassl_fewshot(items, k, repeat=False):
    """Dassl's algorithm step by step on the *global* random module (the caller seeds it, as train.py does)."""
    groups = {}
    for it in items:
        groups.setdefault(it.label, []).append(it)
    out = []
    for _, g in groups.items():
        if len(g) >= k:
            out.extend(random.sample(g, k))
        elif repeat:
            out.extend(random.choices(g, k=k))
        else:
            out.extend(g)
    return out


def stems(items):
    return [os.path.basename(it.impath)[:-4] for it in items]


def test_hardcoded_seed1():
    # Computed once with CPython's random (seed 1) by the literal algorithm; pins the exact subsets.
    assert stems(sample_few_shot(ITEMS, 2, 1)) == ["a1", "a2", "b0", "b1", "c0", "c1"]
    assert stems(sample_few_shot(ITEMS, 3, 1)) == ["a1", "a2", "a0", "b2", "b0", "b1", "c0", "c1"]


@pytest.mark.parametrize("shots", [1, 2, 3, 5])
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("repeat", [False, True])
def test_matches_dassl_train_then_val(shots, seed, repeat):
    val = [Datum(impath=f"/v/{i}.jpg", label=i % 3, classname="") for i in range(12)]
    state = random.getstate()
    try:
        random.seed(seed)
        exp_train = dassl_fewshot(ITEMS, shots, repeat)
        exp_val = dassl_fewshot(val, min(shots, 4), repeat)  # same stream, continued
    finally:
        random.setstate(state)
    before = random.getstate()
    train_k, val_k = few_shot_splits(ITEMS, val, shots, seed, repeat=repeat)
    assert random.getstate() == before, "sampling must not touch the global random state"
    assert train_k == exp_train and val_k == exp_val


def test_small_class_keeps_all_or_repeats():
    out = sample_few_shot(ITEMS, 4, 0)  # class 1 has only 2 items: kept, in list order
    assert [it.impath for it in out if it.label == 1] == ["/x/c0.jpg", "/x/c1.jpg"]
    rep = sample_few_shot(ITEMS, 4, 0, repeat=True)
    assert sum(it.label == 1 for it in rep) == 4 and len(rep) == 12


def test_all_shots_and_bad_inputs():
    assert sample_few_shot(ITEMS, -1, 0) == ITEMS
    for bad in (0, -2):
        with pytest.raises(ValueError, match="shots"):
            sample_few_shot(ITEMS, bad, 0)
    for bad in (1.5, True, "16"):
        with pytest.raises(TypeError, match="shots"):
            sample_few_shot(ITEMS, bad, 0)
    with pytest.raises(TypeError, match="rng"):
        sample_few_shot(ITEMS, 1, "seed")


@pytest.fixture(scope="module")
def caltech(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_synthetic_dataset(str(root), "caltech101", num_classes=5, images_per_class=10, image_size=8, seed=3)
    return str(root)


def test_build_dataset_follows_the_official_order(caltech):
    full = build_dataset("caltech101", caltech)
    state = random.getstate()
    random.seed(2)
    exp_train = dassl_fewshot(full.train_x, 4)
    exp_val = dassl_fewshot(full.val, 4)
    random.setstate(state)
    got = build_dataset("caltech101", caltech, shots=4, seed=2)
    assert got.train_x == exp_train and got.val == exp_val and got.test == full.test
    # sampling happens over all classes *before* the base/new split
    base = build_dataset("caltech101", caltech, shots=4, seed=2, subsample="base")
    assert [it.impath for it in base.train_x] == [it.impath for it in exp_train if it.label < 3]


def test_imagenet_samples_train_only(tmp_path):
    make_synthetic_dataset(str(tmp_path), "imagenet", num_classes=3, images_per_class=6, image_size=8)
    full = build_dataset("imagenet", str(tmp_path))
    got = build_dataset("imagenet", str(tmp_path), shots=2, seed=1)
    random.seed(1)
    assert got.train_x == dassl_fewshot(full.train_x, 2)
    assert got.val == full.val == got.test  # val is the full test set, not sampled
    cache = str(tmp_path / "cache")
    for _ in range(2):  # written, then read back
        cached = build_dataset("imagenet", str(tmp_path), shots=2, seed=1, cache_dir=cache)
        assert cached.train_x == got.train_x and cached.val == full.val


def test_cache_written_atomically_and_reused(caltech, tmp_path):
    cache = str(tmp_path / "cache")
    first = build_dataset("caltech101", caltech, shots=2, seed=1, cache_dir=cache)
    path = os.path.join(cache, "caltech101", "split_fewshot", "shot_2-seed_1.json")
    assert os.path.isfile(path)
    assert [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".tmp")] == []
    assert build_dataset("caltech101", caltech, shots=2, seed=1, cache_dir=cache).train_x == first.train_x
    # the cache is really read: an edited (same-source) cache is returned as stored
    with open(path) as f:
        data = json.load(f)
    data["train"] = data["train"][:1]
    with open(path, "w") as f:
        json.dump(data, f)
    assert build_dataset("caltech101", caltech, shots=2, seed=1, cache_dir=cache).train_x == first.train_x[:1]
    # a cache of another source split is ignored and rewritten
    data["source"] = "stale"
    with open(path, "w") as f:
        json.dump(data, f)
    assert build_dataset("caltech101", caltech, shots=2, seed=1, cache_dir=cache).train_x == first.train_x
    with open(path) as f:
        assert json.load(f)["source"] != "stale"
