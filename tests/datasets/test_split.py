"""CoOp's base/new class split: first ceil(n/2) sorted train labels are base, both halves relabelled."""
from __future__ import annotations

import pytest

from fastprompt.datasets import DatasetSplits, Datum, base_new_split, subsample_classes


def items(labels, tag):
    return [Datum(impath=f"/{tag}/{i}.jpg", label=y, classname=f"c{y}") for i, y in enumerate(labels)]


def splits(n=5):
    return DatasetSplits(name="toy", classnames=[f"c{i}" for i in range(n)], train_x=items([4, 0, 3, 1, 2, 0], "tr"),
                         val=items([1, 4], "va"), test=items(list(range(n)) * 2, "te"),
                         parent_classes=[10, 11, 12, 13, 14])


def test_base_and_new_halves():
    s = splits()
    base, new = base_new_split(s, "base"), base_new_split(s, "new")
    assert base.classnames == ["c0", "c1", "c2"] and new.classnames == ["c3", "c4"]  # ceil(5/2) = 3 base
    assert [(it.impath, it.label) for it in base.train_x] == [("/tr/1.jpg", 0), ("/tr/3.jpg", 1), ("/tr/4.jpg", 2),
                                                             ("/tr/5.jpg", 0)]
    assert [(it.impath, it.label) for it in new.train_x] == [("/tr/0.jpg", 1), ("/tr/2.jpg", 0)]
    assert [it.label for it in new.val] == [1] and [it.classname for it in new.val] == ["c4"]
    assert [it.label for it in base.test] == [0, 1, 2, 0, 1, 2]
    assert base.parent_classes == [10, 11, 12] and new.parent_classes == [13, 14]
    assert base_new_split(s, "all") is s


def test_labels_come_from_train():
    s = splits()
    s.train_x = items([3, 1], "tr")  # only classes 1 and 3 in train: base = [1], new = [3]
    assert base_new_split(s, "base").classnames == ["c1"]
    assert [it.classname for it in base_new_split(s, "new").test] == ["c3", "c3"]


def test_subsample_classes_and_errors():
    sel, (a,) = subsample_classes(items([2, 2, 0], "a"), subsample="new")
    assert sel == [2] and [it.label for it in a] == [0, 0]
    with pytest.raises(ValueError, match="subsample"):
        base_new_split(splits(), "novel")
    with pytest.raises(TypeError, match="DatasetSplits"):
        base_new_split([], "base")
