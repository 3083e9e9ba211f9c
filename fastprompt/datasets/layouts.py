"""Readers for the on-disk layouts: CoOp's 11 datasets, the ImageNet DG targets, ImageFolder, VTAB-1k, VPT FGVC.

Every reader takes the user's root and returns the *full* :class:`DatasetSplits` (no few-shot sampling, no
base/new split: :func:`fastprompt.datasets.build_dataset` applies those). Paths follow CoOp's DATASETS.md: for
the CoOp datasets ``root`` is the folder that holds all of them (Dassl's ``DATASET.ROOT``); for ``imagefolder``,
``vtab`` and the VPT FGVC sets ``root`` is the dataset's own folder (as VPT's ``DATA.DATAPATH``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

from ..templates import dataset_key, template_for
from .base import DatasetSplits, Datum

__all__ = ["DatasetSpec", "SPECS", "get_spec", "IMG_EXTENSIONS"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class DatasetSpec:
    name: str  # snake-case key
    reader: Callable[["DatasetSpec", str], DatasetSplits]
    dataset_dir: str = ""  # folder under root ("" = root itself)
    image_dir: str = ""  # folder under dataset_dir holding the images
    split_file: str = ""  # split_zhou_*.json (CoOp json datasets)
    few_shot: str = "train_val"  # which splits shots apply to: "train_val", "train" (ImageNet), "none" (DG)
    requires: Tuple[str, ...] = ()  # files/dirs (relative to dataset_dir) that must exist
    description: str = ""

    def dir(self, root: str) -> str:
        return os.path.join(os.path.expanduser(root), self.dataset_dir) if self.dataset_dir else \
            os.path.expanduser(root)


def _need(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _listdir_nohidden(path: str) -> List[str]:
    # Sorted, unlike Dassl's listdir_nohidden(sort=False) for ImageNet's image lists: os.listdir order depends on
    # the filesystem, so the official ImageNet 16-shot subset is not reproducible across machines anyway; sorting
    # makes ours deterministic everywhere.
    return sorted(f for f in os.listdir(path) if not f.startswith("."))


def _read_json(path: str):
    """The JSON in ``path``; ValueError naming the file when it is damaged (e.g. a truncated download)."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"{path} is not valid JSON ({exc}); download or copy it again") from None


def _is_image(fname: str) -> bool:
    return fname.lower().endswith(IMG_EXTENSIONS)


def _classnames_from_items(*lists: Sequence[Datum]) -> List[str]:
    """Dassl's ``get_lab2cname`` over the lists, as a list indexed by label (labels must be 0..C-1)."""
    names: Dict[int, str] = {}
    for lst in lists:
        for it in lst:
            known = names.setdefault(it.label, it.classname)
            if known != it.classname:
                raise ValueError(f"label {it.label} has two class names, {known!r} and {it.classname!r} "
                                 f"(e.g. at {it.impath}); one label must have one name")
    if not names:
        return []
    missing = sorted(set(range(max(names) + 1)) - set(names))
    if missing or min(names) < 0:
        raise ValueError(f"labels must be contiguous 0..C-1; missing labels {missing[:10]} (min {min(names)})")
    return [names[y] for y in range(len(names))]


def _splits(spec: DatasetSpec, root: str, classnames, train, val, test, parent=None) -> DatasetSplits:
    return DatasetSplits(name=spec.name, classnames=list(classnames), train_x=train, val=val, test=test,
                         template=template_for(spec.name), root=spec.dir(root), parent_classes=parent)


# ---- CoOp split_zhou_*.json datasets ------------------------------------------------------------------------------

def read_zhou_json(spec: DatasetSpec, root: str) -> DatasetSplits:
    """``[relative_path, label, classname]`` triples per split, relative to the image dir (CoOp ``read_split``)."""
    ddir = _need(spec.dir(root), f"{spec.name} dataset folder")
    image_dir = _need(os.path.join(ddir, spec.image_dir), f"{spec.name} image folder")
    path = _need(os.path.join(ddir, spec.split_file), f"{spec.name} split file")
    split = _read_json(path)
    if not isinstance(split, dict) or any(k not in split for k in ("train", "val", "test")):
        raise ValueError(f"{path}: expected a JSON object with keys 'train', 'val', 'test'")

    def convert(rows) -> List[Datum]:
        out = []
        for row in rows:
            if not (isinstance(row, (list, tuple)) and len(row) == 3):
                raise ValueError(f"{path}: expected [path, label, classname] entries, got {row!r}")
            rel, label, cname = row
            # CoOp joins with the image dir after stripping nothing but a leading '/' is tolerated here too.
            out.append(Datum(impath=os.path.join(image_dir, str(rel).lstrip("/")), label=int(label),
                             classname=str(cname)))
        return out

    train, val, test = convert(split["train"]), convert(split["val"]), convert(split["test"])
    return _splits(spec, root, _classnames_from_items(train, val, test), train, val, test)


# ---- ImageNet and its DG targets ---------------------------------------------------------------------------------

def _read_imagenet_classnames(path: str) -> Dict[str, str]:
    """``classnames.txt``: ``<wnid> <class name with spaces>`` per line, in ImageNet label order."""
    out: Dict[str, str] = {}
    with open(_need(path, "ImageNet classnames.txt"), encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.strip().split(" ")
            if not parts[0]:
                continue
            if len(parts) < 2:
                raise ValueError(f"{path}:{n}: expected '<wnid> <class name>', got {line.strip()!r}")
            out[parts[0]] = " ".join(parts[1:])
    return out


def _read_class_folders(split_dir: str, folders: Sequence[str], names: Dict[str, str], labels: Sequence[int]):
    items = []
    for label, folder in zip(labels, folders):
        if folder not in names:
            raise ValueError(f"class folder {folder!r} of {split_dir} is not in classnames.txt")
        fdir = os.path.join(split_dir, folder)
        items.extend(Datum(impath=os.path.join(fdir, im), label=label, classname=names[folder])
                     for im in _listdir_nohidden(fdir))
    return items


def read_imagenet(spec: DatasetSpec, root: str) -> DatasetSplits:
    """``imagenet/images/{train,val}/<wnid>/*`` + ``imagenet/classnames.txt``; val doubles as test (CoOp)."""
    ddir = _need(spec.dir(root), "imagenet dataset folder")
    names = _read_imagenet_classnames(os.path.join(ddir, "classnames.txt"))
    lists, folders = [], []
    for split in ("train", "val"):
        # CoOp labels each split by its own sorted wnid folders (identical when both hold all 1000 classes).
        sdir = _need(os.path.join(ddir, spec.image_dir, split), f"imagenet {split} folder")
        folders = sorted(e.name for e in os.scandir(sdir) if e.is_dir())
        lists.append(_read_class_folders(sdir, folders, names, range(len(folders))))
    train, test = lists
    return _splits(spec, root, _classnames_from_items(train, test), train, test, test)


def read_imagenetv2(spec: DatasetSpec, root: str) -> DatasetSplits:
    """``imagenetv2/imagenetv2-matched-frequency-format-val/<label>/*`` (folders named 0..999)."""
    ddir = _need(spec.dir(root), "imagenetv2 dataset folder")
    names = _read_imagenet_classnames(os.path.join(ddir, "classnames.txt"))
    image_dir = _need(os.path.join(ddir, spec.image_dir), "imagenetv2 image folder")
    wnids = list(names)
    items = []
    for label, wnid in enumerate(wnids):  # every class folder must exist, as in CoOp
        cdir = _need(os.path.join(image_dir, str(label)), "ImageNetV2 class folder")
        items.extend(Datum(impath=os.path.join(cdir, im), label=label, classname=names[wnid])
                     for im in _listdir_nohidden(cdir))
    return _splits(spec, root, list(names.values()), items, [], items)


def read_imagenet_folders(spec: DatasetSpec, root: str) -> DatasetSplits:
    """ImageNet-Sketch / -A / -R: ``<image_dir>/<wnid>/*``; labels enumerate the sorted wnid folders present, so
    A and R get their 200-class label spaces, derived from the folders (``parent_classes`` maps back to ImageNet)."""
    ddir = _need(spec.dir(root), f"{spec.name} dataset folder")
    names = _read_imagenet_classnames(os.path.join(ddir, "classnames.txt"))
    image_dir = _need(os.path.join(ddir, spec.image_dir), f"{spec.name} image folder")
    folders = [f for f in _listdir_nohidden(image_dir) if os.path.isdir(os.path.join(image_dir, f))]  # skips README.txt
    items = _read_class_folders(image_dir, folders, names, range(len(folders)))
    index = {w: i for i, w in enumerate(names)}
    return _splits(spec, root, [names[f] for f in folders], items, [], items, parent=[index[f] for f in folders])


# ---- FGVCAircraft ----------------------------------------------------------------------------------------------

def read_fgvc_aircraft(spec: DatasetSpec, root: str) -> DatasetSplits:
    """``variants.txt`` (label order) and ``images_variant_{train,val,test}.txt`` (``<image id> <variant>``)."""
    ddir = _need(spec.dir(root), "fgvc_aircraft dataset folder")
    with open(_need(os.path.join(ddir, "variants.txt"), "FGVCAircraft variants.txt"), encoding="utf-8") as f:
        classnames = [line.strip() for line in f if line.strip()]
    c2l = {c: i for i, c in enumerate(classnames)}
    image_dir = os.path.join(ddir, spec.image_dir)
    lists = []
    for split in ("train", "val", "test"):
        path = _need(os.path.join(ddir, f"images_variant_{split}.txt"), f"FGVCAircraft {split} list")
        items = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                parts = line.strip().split(" ")
                if not parts[0]:
                    continue
                cname = " ".join(parts[1:])
                if cname not in c2l:
                    raise ValueError(f"{path}:{n}: variant {cname!r} is not in variants.txt")
                items.append(Datum(impath=os.path.join(image_dir, parts[0] + ".jpg"), label=c2l[cname],
                                   classname=cname))
        lists.append(items)
    return _splits(spec, root, classnames, *lists)


# ---- ImageFolder -----------------------------------------------------------------------------------------------

def read_imagefolder(spec: DatasetSpec, root: str) -> DatasetSplits:
    """``root/{train,val,test}/<class>/*``: classes are train's sorted folders (torchvision's rule), names with
    ``_`` shown as spaces. ``val/`` is optional; without ``test/`` the val split is also the test split."""
    root = os.path.expanduser(root)
    _need(root, "imagefolder root")
    present = [s for s in ("train", "val", "test") if os.path.isdir(os.path.join(root, s))]
    if not present:
        raise FileNotFoundError(f"imagefolder root {root} has none of the folders train/, val/, test/")
    first = os.path.join(root, present[0])
    folders = sorted(e.name for e in os.scandir(first) if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise ValueError(f"{first} has no class folders")
    c2l = {c: i for i, c in enumerate(folders)}
    classnames = [c.replace("_", " ") for c in folders]
    lists = {}
    for split in present:
        sdir = os.path.join(root, split)
        items = []
        for e in sorted(os.scandir(sdir), key=lambda e: e.name):
            if not e.is_dir() or e.name.startswith("."):
                continue
            if e.name not in c2l:
                raise ValueError(f"class folder {e.name!r} in {sdir} is not a class of {first}")
            items.extend(Datum(impath=os.path.join(e.path, im), label=c2l[e.name], classname=classnames[c2l[e.name]])
                         for im in _listdir_nohidden(e.path) if _is_image(im))
        lists[split] = items
    val = lists.get("val", [])
    test = lists.get("test", val)
    return _splits(spec, root, classnames, lists.get("train", []), val, test)


# ---- VTAB-1k list files and VPT's FGVC json splits -------------------------------------------------------------

def _optional_classnames(ddir: str, num_classes: int) -> List[str]:
    path = os.path.join(ddir, "classnames.txt")
    if not os.path.isfile(path):
        return [str(i) for i in range(num_classes)]
    with open(path, encoding="utf-8") as f:
        names = [line.strip().replace("_", " ") for line in f if line.strip()]
    if len(names) != num_classes:
        raise ValueError(f"{path} lists {len(names)} class names for {num_classes} classes")
    return names


def read_vtab(spec: DatasetSpec, root: str) -> DatasetSplits:
    """VTAB-1k as the prepared folders most VPT follow-ups ship: ``train800val200.txt`` (train),
    ``val200.txt`` (val), ``test.txt`` (test), lines ``<path relative to root> <label>``; optional
    ``classnames.txt`` (one per line, label order), otherwise the labels' digits serve as names."""
    ddir = _need(spec.dir(root), "vtab task folder")
    lists = []
    for fname in ("train800val200.txt", "val200.txt", "test.txt"):
        path = _need(os.path.join(ddir, fname), "VTAB-1k list file")
        items = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                    raise ValueError(f"{path}:{n}: expected '<image path> <label>', got {line.strip()!r}")
                items.append(Datum(impath=os.path.join(ddir, parts[0]), label=int(parts[1])))
        lists.append(items)
    num = 1 + max((it.label for lst in lists for it in lst), default=-1)
    names = _optional_classnames(ddir, num)
    lists = [[Datum(impath=it.impath, label=it.label, classname=names[it.label]) for it in lst] for lst in lists]
    return _splits(spec, root, names, *lists)


def read_fgvc_json(spec: DatasetSpec, root: str) -> DatasetSplits:
    """VPT's FGVC layout: ``{train,val,test}.json`` = ``{image path: class id}``, images under ``image_dir``.
    Class ids map to contiguous labels in sorted order, taken over all three splits (VPT maps per split, which is
    the same whenever every split has every class)."""
    ddir = _need(spec.dir(root), f"{spec.name} folder")
    image_dir = _need(os.path.join(ddir, spec.image_dir), f"{spec.name} image folder")
    annos = []
    for split in ("train", "val", "test"):
        anno = _read_json(_need(os.path.join(ddir, f"{split}.json"), f"{spec.name} {split}.json"))
        if not isinstance(anno, dict):
            raise ValueError(f"{split}.json of {ddir}: expected an object {{image path: class id}}")
        annos.append(anno)
    ids = sorted({v for a in annos for v in a.values()})
    c2l = {v: i for i, v in enumerate(ids)}
    names = _optional_classnames(ddir, len(ids))
    lists = [[Datum(impath=os.path.join(image_dir, k), label=c2l[v], classname=names[c2l[v]]) for k, v in a.items()]
             for a in annos]
    return _splits(spec, root, names, *lists)


# ---- the table --------------------------------------------------------------------------------------------------

def _zhou(name, ddir, idir, split, desc):
    return DatasetSpec(name, read_zhou_json, ddir, idir, split, requires=(idir, split), description=desc)


_IN_REQ = ("classnames.txt",)
SPECS: Dict[str, DatasetSpec] = {s.name: s for s in [
    _zhou("caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", "Caltech101, 100 classes"),
    _zhou("oxford_pets", "oxford_pets", "images", "split_zhou_OxfordPets.json", "Oxford-IIIT Pets, 37 classes"),
    _zhou("stanford_cars", "stanford_cars", "", "split_zhou_StanfordCars.json", "Stanford Cars, 196 classes"),
    _zhou("oxford_flowers", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", "Flowers102, 102 classes"),
    _zhou("food101", "food-101", "images", "split_zhou_Food101.json", "Food-101, 101 classes"),
    _zhou("sun397", "sun397", "SUN397", "split_zhou_SUN397.json", "SUN397, 397 classes"),
    _zhou("dtd", "dtd", "images", "split_zhou_DescribableTextures.json", "DTD, 47 classes"),
    _zhou("eurosat", "eurosat", "2750", "split_zhou_EuroSAT.json", "EuroSAT, 10 classes"),
    _zhou("ucf101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", "UCF101 mid-frames, 101 classes"),
    DatasetSpec("imagenet", read_imagenet, "imagenet", "images", few_shot="train",
                requires=("classnames.txt", "images/train", "images/val"), description="ImageNet-1k (val = test)"),
    DatasetSpec("fgvc_aircraft", read_fgvc_aircraft, "fgvc_aircraft", "images",
                requires=("images", "variants.txt", "images_variant_train.txt", "images_variant_val.txt",
                          "images_variant_test.txt"), description="FGVC-Aircraft variants, 100 classes"),
    DatasetSpec("imagenetv2", read_imagenetv2, "imagenetv2", "imagenetv2-matched-frequency-format-val",
                few_shot="none", requires=_IN_REQ + ("imagenetv2-matched-frequency-format-val",),
                description="ImageNetV2 matched-frequency (DG target, test only)"),
    DatasetSpec("imagenet_sketch", read_imagenet_folders, "imagenet-sketch", "images", few_shot="none",
                requires=_IN_REQ + ("images",), description="ImageNet-Sketch (DG target, test only)"),
    DatasetSpec("imagenet_a", read_imagenet_folders, "imagenet-adversarial", "imagenet-a", few_shot="none",
                requires=_IN_REQ + ("imagenet-a",), description="ImageNet-A, 200 classes (DG target, test only)"),
    DatasetSpec("imagenet_r", read_imagenet_folders, "imagenet-rendition", "imagenet-r", few_shot="none",
                requires=_IN_REQ + ("imagenet-r",), description="ImageNet-R, 200 classes (DG target, test only)"),
    DatasetSpec("imagefolder", read_imagefolder, description="root/{train,val,test}/<class>/* (val, test optional)"),
    DatasetSpec("vtab", read_vtab, requires=("train800val200.txt", "val200.txt", "test.txt"),
                description="one VTAB-1k task folder: train800val200.txt, val200.txt, test.txt list files"),
    DatasetSpec("fgvc_json", read_fgvc_json, image_dir="", requires=("train.json", "val.json", "test.json"),
                description="VPT FGVC json splits, images under root"),
    DatasetSpec("cub", read_fgvc_json, image_dir="images", requires=("images", "train.json", "val.json", "test.json"),
                description="VPT FGVC: CUB-200-2011 (images/)"),
    DatasetSpec("nabirds", read_fgvc_json, image_dir="images",
                requires=("images", "train.json", "val.json", "test.json"), description="VPT FGVC: NABirds (images/)"),
    DatasetSpec("stanford_dogs", read_fgvc_json, image_dir="Images",
                requires=("Images", "train.json", "val.json", "test.json"),
                description="VPT FGVC: Stanford Dogs (Images/)"),
]}

_FOLDER_READERS = (read_imagenet, read_imagenetv2, read_imagenet_folders, read_imagefolder)
_ALIASES = {"caltech-101": "caltech101", "imagenet-sketch": "imagenet_sketch", "imagenet-a": "imagenet_a",
            "imagenet-r": "imagenet_r", "imagenet_v2": "imagenetv2", "flowers102": "oxford_flowers",
            "describabletextures": "dtd", "vtab1k": "vtab", "vtab_1k": "vtab", "image_folder": "imagefolder"}


def get_spec(name: str) -> DatasetSpec:
    """The layout of dataset ``name`` (snake-case key, Dassl CamelCase name, or a known alias)."""
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str, got {name!r}")
    key = dataset_key(name)
    key = _ALIASES.get(key, key)
    if key not in SPECS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(sorted(SPECS))}")
    return SPECS[key]


def expected_paths(spec: DatasetSpec, root: str) -> List[str]:
    ddir = spec.dir(root)
    return [ddir] + [os.path.join(ddir, r) for r in spec.requires]


def find_problems(spec: DatasetSpec, root: str, max_listed: int = 5) -> List[str]:
    """What is missing or broken for ``spec`` under ``root`` (empty list = ready)."""
    problems = [f"missing: {p}" for p in expected_paths(spec, root) if not os.path.exists(p)]
    if problems:
        return problems
    try:
        splits = spec.reader(spec, root)
    except (OSError, ValueError, KeyError) as e:  # malformed split files, unknown class folders, ...
        return [f"cannot read {spec.name}: {e}"]
    items = [it for lst in (splits.train_x, splits.val, splits.test) for it in lst]
    if not items:
        return [f"{spec.name} under {spec.dir(root)} has no images"]
    if spec.reader in _FOLDER_READERS:
        return problems  # images were listed from the folders themselves: no need to stat a million files
    missing = sorted({it.impath for it in items if not os.path.isfile(it.impath)})
    if missing:
        shown = ", ".join(missing[:max_listed])
        more = f" (and {len(missing) - max_listed} more)" if len(missing) > max_listed else ""
        problems.append(f"{len(missing)} image files listed by the split are missing: {shown}{more}")
    return problems
