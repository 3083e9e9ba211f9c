"""DPC's hard-negative miner on hand-built score matrices, and the pre-indexed image library.

Expected lists are written by hand from DPC's released miner (docs/methods/dpc.md): top-K minus the ground truth in rank
order, non-repeat against every ground truth and every earlier sample's negatives, then a bounded random
fallback (CoOp: randint(1, C-2)) up to two negatives.
"""
from __future__ import annotations

import random

import pytest
import torch

from fastprompt.datasets.base import DatasetSplits, Datum
from fastprompt.learners._hard_negatives import ImageLibrary, mine_hard_negatives


class ScriptedRNG:
    """randint returns the scripted values in order (and records the ranges asked for)."""

    def __init__(self, values):
        self.values, self.calls = list(values), []

    def randint(self, lo, hi):
        self.calls.append((lo, hi))
        return self.values.pop(0)

    def choice(self, seq):
        return seq[0]


def scores_from_ranks(ranks, C):
    """Rows whose descending order is the given rank list (classes not listed come after, ascending)."""
    out = torch.zeros(len(ranks), C, dtype=torch.float64)
    for i, order in enumerate(ranks):
        rest = [c for c in range(C) if c not in order]
        for pos, c in enumerate(list(order) + rest):
            out[i, c] = C - pos
    return out.softmax(dim=-1)


def test_gt_in_topk_and_non_repeat():
    # C=8, K=3. Sample 0 (gt 0): top-3 [0, 2, 3] -> drop gt -> [2, 3]; neither seen ({0, 1}) -> [2, 3].
    # Sample 1 (gt 1): top-3 [2, 4, 5] (gt not in top-K: K candidates) -> 2 already used -> [4, 5].
    # Sample 2 (gt 6): top-3 [6, 7, 1] -> [7, 1] -> 1 is a batch ground truth -> [7] -> fallback tops up.
    scores = scores_from_ranks([[0, 2, 3], [2, 4, 5], [6, 7, 1]], 8)
    rng = ScriptedRNG([3, 6, 1, 5, 2, 4])  # 1..6 are all used -> nothing new in the C-2 = 6 bounded draws
    out = mine_hard_negatives(scores, torch.tensor([0, 1, 6]), 3, rng)
    assert out == [[2, 3], [4, 5], [7]]
    assert rng.calls == [(1, 6)] * 6  # CoOp's range 1..C-2, at most C-2 draws


def test_fallback_draws_until_two_then_one_more():
    # C=6, K=2, one sample (gt 2): top-2 [2, 0] -> [0]; 0 is new -> [0]; fallback needs one more.
    # Draws: 2 (gt, seen) -> skip; 0 (taken) -> skip; 4 -> kept ([0, 4]); the next draw (1) only ends the loop.
    scores = scores_from_ranks([[2, 0]], 6)
    rng = ScriptedRNG([2, 0, 4, 1, 3])
    out = mine_hard_negatives(scores, torch.tensor([2]), 2, rng)
    assert out == [[0, 4]]
    assert len(rng.calls) == 4 and rng.values == [3]


def test_fallback_from_empty_and_promptkd_range():
    # C=5, K=1, gt 3 with top-1 = 3 -> no candidate; fallback draws 4 then 1 (promptkd range 1..4).
    scores = scores_from_ranks([[3]], 5)
    rng = ScriptedRNG([4, 1, 2])
    out = mine_hard_negatives(scores, torch.tensor([3]), 1, rng, fallback="promptkd")
    assert out == [[4, 1]]
    assert rng.calls[0] == (1, 4)


def test_candidates_keep_rank_order_and_gt_excluded():
    # GT 5 ranked second among the top-4 -> the 3 others in rank order; the second sample shares GT 5 and its
    # top-4 [1, 5, 2, 0] leaves [2, 0] minus used (2 is taken by sample 0) -> [0]; then fallback picks 3.
    scores = scores_from_ranks([[4, 5, 2, 1], [1, 5, 2, 0]], 7)
    rng = ScriptedRNG([5, 3, 6])
    out = mine_hard_negatives(scores, torch.tensor([5, 5]), 4, rng)
    assert out == [[4, 2, 1], [0, 3]]


def test_after_sample_is_called_in_order():
    scores = scores_from_ranks([[1, 2], [0, 2]], 4)
    seen = []
    mine_hard_negatives(scores, torch.tensor([0, 1]), 2, random.Random(0), after_sample=lambda i, n: seen.append((i, list(n))))
    assert [i for i, _ in seen] == [0, 1]


def test_errors():
    scores = torch.rand(2, 5)
    with pytest.raises(ValueError, match="larger than the number of training classes"):
        mine_hard_negatives(scores, torch.tensor([0, 1]), 6)
    with pytest.raises(ValueError, match="positive int"):
        mine_hard_negatives(scores, torch.tensor([0, 1]), 0)
    with pytest.raises(ValueError, match="labels must lie"):
        mine_hard_negatives(scores, torch.tensor([0, 5]), 2)
    with pytest.raises(ValueError, match=r"\[B=2\]"):
        mine_hard_negatives(scores, torch.tensor([0]), 2)
    with pytest.raises(ValueError, match="fallback"):
        mine_hard_negatives(scores, torch.tensor([0, 1]), 2, fallback="x")


# ---------------------------------------------------------------------- image library
def _png(path, value):
    from PIL import Image

    Image.new("RGB", (8, 8), (value, value, value)).save(path)
    return str(path)


def test_library_indexes_the_few_shot_train_set_only(tmp_path):
    train = [Datum(_png(tmp_path / f"t{c}_{k}.png", 10 * c + k), c) for c in range(3) for k in range(2)]
    test = [Datum(_png(tmp_path / "test.png", 200), 0)]
    ds = DatasetSplits("toy", ["a", "b", "c"], train_x=train, test=test)
    loaded = []

    def load(path):
        loaded.append(path)
        from PIL import Image

        return Image.open(path).convert("RGB")

    import torchvision.transforms as T

    lib = ImageLibrary.from_dataset(ds, T.ToTensor(), load)
    assert lib.labels == [0, 1, 2] and len(lib) == 6
    assert all(not p.endswith("test.png") for entries in lib.items.values() for p in entries)
    imgs = lib.sample([2, 0], random.Random(0))
    assert [tuple(i.shape) for i in imgs] == [(3, 8, 8)] * 2
    assert loaded[0] in lib.items[2] and loaded[1] in lib.items[0]
    # pixel value identifies the class (10 * c + k)
    assert round(float(imgs[0][0, 0, 0]) * 255) in (20, 21) and round(float(imgs[1][0, 0, 0]) * 255) in (0, 1)
    with pytest.raises(ValueError, match="class 5 has no image"):
        lib.sample([5], random.Random(0))


def test_library_from_tensors_and_bad_loader(tmp_path):
    lib = ImageLibrary.from_tensors({0: torch.zeros(2, 3, 4, 4), 1: [torch.ones(3, 4, 4)]})
    assert torch.equal(lib.sample([1], random.Random(0))[0], torch.ones(3, 4, 4))
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        ImageLibrary.from_tensors({0: [torch.zeros(4, 4)]})
    no_tf = ImageLibrary({0: [_png(tmp_path / "x.png", 1)]})
    with pytest.raises(TypeError, match="not a tensor"):
        no_tf.sample([0], random.Random(0))
