"""The multi-task dataset: per-task label spaces, global columns, mixed batches, a loader with real image
files feeding SoftCPT, and General-10 through the dataset layer (synthetic CoOp layouts)."""
from __future__ import annotations

import pytest
import torch

import fastprompt
from fastprompt.datasets.base import DatasetSplits, Datum
from fastprompt.datasets.multitask import GENERAL10, GENERAL10_TASKNAMES, MultiTaskDataset, general10
from tests.conftest import tiny_clip


def toy(name, classes, per_class, root="/x"):
    train = [Datum(f"{root}/{name}/{c}_{k}.png", c, classes[c]) for c in range(len(classes)) for k in range(per_class)]
    return DatasetSplits(name, list(classes), train_x=train, test=train[:1])


def test_offsets_labels_and_batches():
    mt = MultiTaskDataset([("pets", toy("pets", ["dog", "cat"], 3)), ("cars", toy("cars", ["audi", "bmw", "vw"], 2))])
    assert mt.tasknames == ["pets", "cars"] and mt.num_classes == [2, 3] and mt.offsets == [0, 2, 5]
    assert len(mt.train_x) == 12 and len(mt.test) == 2
    bmw = [d for d in mt.train_x if d.classname == "bmw"][0]
    assert (bmw.task, bmw.label, bmw.global_label) == (1, 1, 3)
    assert mt.learner_kwargs() == {"classnames": [["dog", "cat"], ["audi", "bmw", "vw"]], "tasknames": ["pets", "cars"]}
    batches = list(mt.batches("train_x", 5, seed=0))
    assert [len(b) for b in batches] == [5, 5, 2]
    assert sorted(d.impath for b in batches for d in b) == sorted(d.impath for d in mt.train_x)  # one epoch
    assert any(len({d.task for d in b}) == 2 for b in batches)  # tasks mixed at random
    assert list(mt.batches("train_x", 5, shuffle=False))[0] == mt.train_x[:5]
    assert [len(b) for b in mt.batches("train_x", 5, seed=0, drop_last=True)] == [5, 5]


def test_errors():
    with pytest.raises(ValueError, match="at least one"):
        MultiTaskDataset([])
    with pytest.raises(TypeError, match="DatasetSplits"):
        MultiTaskDataset([("a", [1, 2])])
    with pytest.raises(ValueError, match="twice"):
        MultiTaskDataset([("a", toy("a", ["x"], 1)), ("a", toy("b", ["y"], 1))])
    bad = DatasetSplits("b", ["x"], train_x=[Datum("/p.png", 3)])
    with pytest.raises(ValueError, match="label 3 outside"):
        MultiTaskDataset([("b", bad)])
    mt = MultiTaskDataset([("a", toy("a", ["x"], 1))])
    with pytest.raises(ValueError, match="split"):
        mt.items("train")
    with pytest.raises(ValueError, match="batch_size"):
        next(mt.batches("train_x", 0))


def test_loader_feeds_softcpt(tmp_path):
    from PIL import Image
    import torchvision.transforms as T

    tasks = []
    for name, classes in (("pets", ["dog", "cat"]), ("food", ["pizza", "sushi", "ramen"])):
        train = []
        for c, cname in enumerate(classes):
            path = tmp_path / f"{name}_{c}.png"
            Image.new("RGB", (32, 32), (40 * c, 0, 0)).save(path)
            train.append(Datum(str(path), c, cname))
        tasks.append((name + " recognition", DatasetSplits(name, classes, train_x=train)))
    mt = MultiTaskDataset(tasks)
    batch = next(iter(mt.loader("train_x", batch_size=5, transform=T.ToTensor(), seed=0)))
    assert batch["img"].shape == (5, 3, 32, 32)
    assert torch.equal(batch["global_label"], torch.tensor(mt.offsets[:-1])[batch["task"]] + batch["label"])
    model = tiny_clip()
    sc = fastprompt.create_learner("softcpt", model, n_ctx=2, task_n_ctx=1, **mt.learner_kwargs())
    loss, logits = sc.compute_loss(batch["img"].double(), batch["label"], batch["task"])
    assert torch.isfinite(loss) and logits.shape == (5, 5)


def test_general10_on_synthetic_layouts(tmp_path):
    datasets = pytest.importorskip("fastprompt.datasets")
    if not hasattr(datasets, "build_dataset") or not hasattr(datasets, "make_synthetic_dataset"):
        pytest.skip("the dataset layer has no build_dataset / make_synthetic_dataset yet")
    for name in GENERAL10:
        datasets.make_synthetic_dataset(str(tmp_path), name, num_classes=2, images_per_class=3, image_size=8)
    mt = general10(str(tmp_path), shots=1, seed=1, tasknames={"dtd": "describable textures"})
    assert mt.num_tasks == 10 and mt.num_classes == [2] * 10
    assert mt.tasknames[0] == GENERAL10_TASKNAMES["caltech101"] and mt.tasknames[1] == "describable textures"
    assert len(mt.train_x) == 20 and {d.task for d in mt.train_x} == set(range(10))
    base = general10(str(tmp_path), shots=1, subsample="base")
    assert base.num_classes == [1] * 10
    with pytest.raises(ValueError, match="unknown datasets"):
        general10(str(tmp_path), tasknames={"imagenet": "x"})
