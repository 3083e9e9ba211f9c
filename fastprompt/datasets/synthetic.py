"""Tiny synthetic datasets in the real on-disk layouts, for tests, examples and end-to-end CLI runs.

Each class gets its own colour (hue spread evenly) and stripe pattern (orientation and frequency), with
per-image noise, jitter and phase, so a model can actually learn the classes while every image differs.
"""
from __future__ import annotations

import colorsys
import json
import math
import os
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image

from fastprompt.datasets.classlists import list_classname_sets, load_classnames

__all__ = ["make_synthetic_dataset", "SYNTHETIC_LAYOUTS"]

# split_zhou json layouts share one writer; the others have their own.
_ZHOU = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "food101": ("food-101", "images", "split_zhou_Food101.json"),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
}
_IMAGENET_DG = {  # layout -> (dataset dir, image dir, folder naming)
    "imagenetv2": ("imagenetv2", "imagenetv2-matched-frequency-format-val", "index"),
    "imagenet_sketch": ("imagenet-sketch", "images", "wnid"),
    "imagenet_a": ("imagenet-adversarial", "imagenet-a", "wnid"),
    "imagenet_r": ("imagenet-rendition", "imagenet-r", "wnid"),
}
SYNTHETIC_LAYOUTS = tuple(sorted(list(_ZHOU) + list(_IMAGENET_DG) + ["imagenet", "fgvc_aircraft", "imagefolder",
                                                                      "vtab", "fgvc_json"]))


def _classnames(layout: str, n: int) -> List[str]:
    """Real names of the matching shipped list where there are enough (realistic token lengths), else generic."""
    source = {"imagefolder": "oxford_pets", "vtab": "dtd", "fgvc_json": "oxford_flowers"}.get(layout, layout)
    source = "imagenet" if source.startswith("imagenet") else source
    names = load_classnames(source) if source in list_classname_sets() else []
    if len(names) < n:
        names = [f"synthetic class {i}" for i in range(n)]
    return names[:n]


def _image(label: int, num_classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """[size, size, 3] uint8: the class colour, modulated by the class's stripe pattern, plus noise."""
    hue = label / max(num_classes, 1)
    base = np.array(colorsys.hsv_to_rgb(hue, 0.8, 0.9))
    angle = math.pi * ((label * 0.618) % 1.0)  # golden-ratio spread of orientations
    freq = 2.0 + (label % 4)
    yy, xx = np.mgrid[0:size, 0:size] / size
    phase = rng.uniform(0, 2 * math.pi)
    wave = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)) + phase)
    img = base[None, None, :] * (0.55 + 0.45 * wave[..., None])
    img = img * rng.uniform(0.85, 1.15) + rng.normal(0.0, 0.04, size=img.shape)
    return (np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)


def _save(path: str, arr: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # JPEG-named files are written as PNG data: PIL opens by content, so paths keep the real layouts' names
    # while pixels stay lossless and deterministic.
    Image.fromarray(arr).save(path, format="PNG")


def _split_counts(n: int, with_test: bool = True) -> Tuple[int, int, int]:
    """train/val/test images per class out of n: about 60/20/20, at least one each."""
    val = max(1, n // 5)
    test = max(1, n // 5) if with_test else 0
    return n - val - test, val, test


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)


def make_synthetic_dataset(root: str, layout: str, num_classes: int, images_per_class: int, image_size: int = 32,
                           seed: int = 0) -> str:
    """Write a small dataset in ``layout`` under ``root`` and return the root to pass to ``build_dataset``.

    layout: one of :data:`SYNTHETIC_LAYOUTS` (``"caltech101"`` and the other split_zhou names, ``"imagenet"`` and
    its DG targets, ``"fgvc_aircraft"``, ``"imagefolder"``, ``"vtab"``, ``"fgvc_json"``); load it with
    ``build_dataset(layout, returned_root)``. ``images_per_class`` is the total per class, split about 60/20/20
    into train/val/test (ImageNet: 80/20 train/val; the DG targets: all test), so it must be >= 3 (>= 2 for
    ImageNet, >= 1 for DG targets). Images are ``image_size``² RGB with class-dependent colour and stripes; the
    same ``seed`` writes identical files. For the CoOp layouts ``root`` is the data root (the dataset's folder is
    created inside it), for ``imagefolder`` / ``vtab`` / ``fgvc_json`` it is the dataset folder itself.
    """
    if layout not in SYNTHETIC_LAYOUTS:
        raise ValueError(f"unknown synthetic layout {layout!r}; available: {', '.join(SYNTHETIC_LAYOUTS)}")
    for arg, val, lo in (("num_classes", num_classes, 1), ("images_per_class", images_per_class, 1),
                         ("image_size", image_size, 4), ("seed", seed, 0)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise TypeError(f"{arg} must be an int, got {val!r}")
        if val < lo:
            raise ValueError(f"{arg} must be >= {lo}, got {val}")
    need = 1 if layout in _IMAGENET_DG else 2 if layout == "imagenet" else 3
    if images_per_class < need:
        raise ValueError(f"layout {layout!r} needs images_per_class >= {need} (train/val/test), got {images_per_class}")
    root = os.path.abspath(os.path.expanduser(root))
    rng = np.random.default_rng(seed)
    names = _classnames(layout, num_classes)

    def image(label: int, path: str) -> None:
        _save(path, _image(label, num_classes, image_size, rng))

    if layout in _ZHOU:
        ddir, idir, split_file = _ZHOU[layout]
        image_dir = os.path.join(root, ddir, idir)
        split: Dict[str, list] = {"train": [], "val": [], "test": []}
        counts = _split_counts(images_per_class)
        for label, name in enumerate(names):
            folder = name.replace(" ", "_").replace("/", "_")
            k = 0
            for s, cnt in zip(("train", "val", "test"), counts):
                for _ in range(cnt):
                    rel = f"{folder}/image_{k:04d}.jpg"
                    image(label, os.path.join(image_dir, rel))
                    split[s].append([rel, label, name])
                    k += 1
        _write_json(os.path.join(root, ddir, split_file), split)
    elif layout == "imagenet" or layout in _IMAGENET_DG:
        wnids = [f"n{i:08d}" for i in range(num_classes)]
        if layout == "imagenet":
            ddir = os.path.join(root, "imagenet")
            tr, va, _ = _split_counts(images_per_class, with_test=False)
            for label, w in enumerate(wnids):
                for s, cnt in (("train", tr), ("val", va)):
                    for k in range(cnt):
                        image(label, os.path.join(ddir, "images", s, w, f"{w}_{s}_{k:04d}.JPEG"))
        else:
            dname, idir, naming = _IMAGENET_DG[layout]
            ddir = os.path.join(root, dname)
            # A and R hold a subset of the classes (every other one here, like their 200 of 1000).
            labels = range(0, num_classes, 2) if layout in ("imagenet_a", "imagenet_r") else range(num_classes)
            for label in labels:
                folder = str(label) if naming == "index" else wnids[label]
                for k in range(images_per_class):
                    image(label, os.path.join(ddir, idir, folder, f"img_{k:04d}.jpg"))
            if layout in ("imagenet_a", "imagenet_r"):
                with open(os.path.join(ddir, idir, "README.txt"), "w") as f:
                    f.write("synthetic\n")  # the real archives ship one; the readers must skip it
        with open(os.path.join(ddir, "classnames.txt"), "w", encoding="utf-8") as f:
            f.writelines(f"{w} {n}\n" for w, n in zip(wnids, names))
    elif layout == "fgvc_aircraft":
        ddir = os.path.join(root, "fgvc_aircraft")
        os.makedirs(ddir, exist_ok=True)
        lines: Dict[str, List[str]] = {"train": [], "val": [], "test": []}
        idx = 1000000
        for label, name in enumerate(names):
            for s, cnt in zip(("train", "val", "test"), _split_counts(images_per_class)):
                for _ in range(cnt):
                    image(label, os.path.join(ddir, "images", f"{idx}.jpg"))
                    lines[s].append(f"{idx} {name}\n")
                    idx += 1
        with open(os.path.join(ddir, "variants.txt"), "w", encoding="utf-8") as f:
            f.writelines(f"{n}\n" for n in names)
        for s, ls in lines.items():
            with open(os.path.join(ddir, f"images_variant_{s}.txt"), "w", encoding="utf-8") as f:
                f.writelines(ls)
    elif layout == "imagefolder":
        for label, name in enumerate(names):
            folder = name.replace(" ", "_").replace("/", "_")
            for s, cnt in zip(("train", "val", "test"), _split_counts(images_per_class)):
                for k in range(cnt):
                    image(label, os.path.join(root, s, folder, f"{k:04d}.png"))
    elif layout == "vtab":
        rows: Dict[str, List[str]] = {"train": [], "val": [], "test": []}
        k = 0
        for label in range(num_classes):
            for s, cnt in zip(("train", "val", "test"), _split_counts(images_per_class)):
                for _ in range(cnt):
                    rel = f"images/{s}/{k:06d}.png"
                    image(label, os.path.join(root, rel))
                    rows[s].append(f"{rel} {label}\n")
                    k += 1
        # VTAB-1k convention: train800 + val200 = train800val200; here "train" plays train800.
        files = {"train800.txt": rows["train"], "val200.txt": rows["val"],
                 "train800val200.txt": rows["train"] + rows["val"], "test.txt": rows["test"]}
        for fname, ls in files.items():
            with open(os.path.join(root, fname), "w", encoding="utf-8") as f:
                f.writelines(ls)
        with open(os.path.join(root, "classnames.txt"), "w", encoding="utf-8") as f:
            f.writelines(f"{n}\n" for n in names)
    else:  # fgvc_json (VPT): {split}.json = {relative image path: class id}, ids 1-based like CUB's
        annos: Dict[str, Dict[str, int]] = {"train": {}, "val": {}, "test": {}}
        for label, name in enumerate(names):
            folder = f"{label + 1:03d}.{name.replace(' ', '_')}"
            for s, cnt in zip(("train", "val", "test"), _split_counts(images_per_class)):
                for k in range(cnt):
                    rel = f"{folder}/{s}_{k:04d}.jpg"
                    image(label, os.path.join(root, rel))
                    annos[s][rel] = label + 1
        for s, a in annos.items():
            _write_json(os.path.join(root, f"{s}.json"), a)
        with open(os.path.join(root, "classnames.txt"), "w", encoding="utf-8") as f:
            f.writelines(f"{n}\n" for n in names)
    return root
