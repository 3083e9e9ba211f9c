"""Every layout loads from a synthetic tree; check_dataset reports what is missing; clear errors."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from fastprompt.datasets import (SYNTHETIC_LAYOUTS, build_dataset, check_dataset, list_datasets,
                                 make_synthetic_dataset)
from fastprompt.templates import template_for

C, N = 4, 5  # classes, images per class (3/1/1 train/val/test; ImageNet 4/1; DG targets 5 test)


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    out = {}
    for layout in SYNTHETIC_LAYOUTS:
        root = str(tmp_path_factory.mktemp(layout))
        out[layout] = make_synthetic_dataset(root, layout, num_classes=C, images_per_class=N, image_size=8, seed=1)
    return out


@pytest.mark.parametrize("layout", SYNTHETIC_LAYOUTS)
def test_layout_loads(trees, layout):
    assert layout in list_datasets()
    s = build_dataset(layout, trees[layout])
    dg = layout in ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
    n_cls = C // 2 if layout in ("imagenet_a", "imagenet_r") else C
    assert s.num_classes == n_cls and len(set(s.classnames)) == n_cls
    assert s.template == template_for(layout)
    assert s.template.format("x") != "x"
    assert check_dataset(layout, trees[layout]) == []
    if dg:
        assert len(s.test) == n_cls * N and s.val == []
    elif layout == "vtab":  # train = train800val200, i.e. train800 + val200
        assert (len(s.train_x), len(s.val), len(s.test)) == (4 * C, C, C)
    elif layout == "imagenet":
        assert len(s.train_x) == C * 4 and s.val == s.test and len(s.test) == C
    else:
        assert (len(s.train_x), len(s.val), len(s.test)) == (3 * C, C, C)
    for it in s.train_x + s.val + s.test:
        assert os.path.isabs(it.impath) and os.path.isfile(it.impath)
        assert 0 <= it.label < n_cls and it.classname == s.classnames[it.label]
    assert sorted({it.label for it in s.test}) == list(range(n_cls))


def test_imagenet_subsets_map_to_parent(trees):
    a = build_dataset("imagenet_a", trees["imagenet_a"])
    full = build_dataset("imagenet", trees["imagenet"])
    assert a.parent_classes == [0, 2]  # the synthetic A keeps every other class; README.txt is skipped
    assert a.classnames == [full.classnames[i] for i in a.parent_classes]
    assert build_dataset("imagenet_r", trees["imagenet_r"], subsample="new").parent_classes == [2]


def test_names_and_aliases(trees, tmp_path):
    pets = build_dataset("OxfordPets", trees["oxford_pets"])  # Dassl's CamelCase name
    assert pets.name == "oxford_pets" and pets.template == "a photo of a {}, a type of pet."
    root = make_synthetic_dataset(str(tmp_path), "imagefolder", 5, 3, image_size=8)
    assert os.path.isdir(os.path.join(root, "train", "British_Shorthair"))
    folder = build_dataset("imagefolder", root)
    assert folder.classnames[4] == "British Shorthair"  # folder names: '_' shown as a space


def test_split_file_contents(trees):
    path = os.path.join(trees["caltech101"], "caltech-101", "split_zhou_Caltech101.json")
    with open(path) as f:
        split = json.load(f)
    rel, label, name = split["train"][0]
    assert isinstance(rel, str) and not rel.startswith("/") and label == 0 and name == "accordion"


def test_synthetic_is_deterministic_and_learnable(tmp_path):
    a = make_synthetic_dataset(str(tmp_path / "a"), "imagefolder", 6, 5, image_size=16, seed=7)
    b = make_synthetic_dataset(str(tmp_path / "b"), "imagefolder", 6, 5, image_size=16, seed=7)
    sa, sb = build_dataset("imagefolder", a), build_dataset("imagefolder", b)
    for x, y in zip(sa.test, sb.test):
        with open(x.impath, "rb") as f, open(y.impath, "rb") as g:
            assert f.read() == g.read()
    from PIL import Image

    def feats(items):
        return np.stack([np.asarray(Image.open(it.impath).convert("RGB"), dtype=np.float64).mean((0, 1))
                         for it in items])

    train, test = feats(sa.train_x), feats(sa.test)
    ytr, yte = np.array([it.label for it in sa.train_x]), np.array([it.label for it in sa.test])
    centroids = np.stack([train[ytr == c].mean(0) for c in range(6)])
    pred = ((test[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == yte).all()  # even mean colour separates the classes


def test_check_dataset_reports_missing(tmp_path, trees):
    probs = check_dataset("oxford_pets", str(tmp_path))
    assert probs and "oxford_pets" in probs[0] and "missing" in probs[0]
    root = make_synthetic_dataset(str(tmp_path / "d"), "dtd", 2, 3, image_size=8)
    os.remove(os.path.join(root, "dtd", "split_zhou_DescribableTextures.json"))
    assert any("split_zhou_DescribableTextures.json" in p for p in check_dataset("dtd", root))
    root = make_synthetic_dataset(str(tmp_path / "e"), "eurosat", 2, 3, image_size=8)
    s = build_dataset("eurosat", root)
    os.remove(s.test[0].impath)
    probs = check_dataset("eurosat", root)
    assert len(probs) == 1 and "1 image files" in probs[0] and s.test[0].impath in probs[0]
    root = make_synthetic_dataset(str(tmp_path / "f"), "fgvc_aircraft", 2, 3, image_size=8)
    with open(os.path.join(root, "fgvc_aircraft", "images_variant_val.txt"), "a") as f:
        f.write("123 Not A Variant\n")
    assert "not in variants.txt" in check_dataset("fgvc_aircraft", root)[0]
    assert any("train800val200.txt" in p for p in check_dataset("vtab", str(tmp_path)))
    root = make_synthetic_dataset(str(tmp_path / "v2"), "imagenetv2", 3, 1, image_size=8)
    os.rename(os.path.join(root, "imagenetv2", "imagenetv2-matched-frequency-format-val", "2"),
              os.path.join(root, "elsewhere"))
    assert "ImageNetV2 class folder not found" in check_dataset("imagenetv2", root)[0]


def test_bad_inputs(trees, tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        build_dataset("nope", trees["dtd"])
    with pytest.raises(ValueError, match="unknown dataset"):
        check_dataset("nope", trees["dtd"])
    with pytest.raises(ValueError, match="shots"):
        build_dataset("dtd", trees["dtd"], shots=0)
    with pytest.raises(TypeError, match="seed"):
        build_dataset("dtd", trees["dtd"], seed="1")
    with pytest.raises(ValueError, match="subsample"):
        build_dataset("dtd", trees["dtd"], subsample="novel")
    with pytest.raises(FileNotFoundError, match="dtd dataset folder not found"):
        build_dataset("dtd", str(tmp_path))
    with pytest.raises(ValueError, match="unknown synthetic layout"):
        make_synthetic_dataset(str(tmp_path), "mnist", 2, 3)
    with pytest.raises(ValueError, match="images_per_class >= 3"):
        make_synthetic_dataset(str(tmp_path), "dtd", 2, 2)
    with pytest.raises(TypeError, match="num_classes"):
        make_synthetic_dataset(str(tmp_path), "dtd", 2.0, 3)


def test_vpt_fgvc_named_layouts(tmp_path):
    import shutil

    src = make_synthetic_dataset(str(tmp_path / "src"), "fgvc_json", 3, 3, image_size=8)
    for name, sub in (("cub", "images"), ("stanford_dogs", "Images")):
        root = tmp_path / name
        shutil.copytree(src, root / sub)
        for f in ("train.json", "val.json", "test.json", "classnames.txt"):
            shutil.move(str(root / sub / f), str(root / f))
        assert check_dataset(name, str(root)) == []
        s = build_dataset(name, str(root))
        assert s.num_classes == 3 and all(f"/{sub}/" in it.impath for it in s.test)
    assert any("Images" in p for p in check_dataset("stanford_dogs", str(tmp_path / "cub")))


def test_families():
    coop = list_datasets("coop")
    assert len(coop) == 15 and "imagenet_r" in coop and "imagefolder" not in coop
    assert sorted(coop + list_datasets("vpt") + list_datasets("folder")) == list_datasets()
    with pytest.raises(ValueError, match="family"):
        list_datasets("tfds")
