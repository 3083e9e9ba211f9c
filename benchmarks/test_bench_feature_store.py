"""Base-to-new evaluation of 2 methods x 3 seeds with and without the image-feature store, same run.

ViT-B/16 architecture with random weights, float32, on a synthetic caltech101-layout dataset of 224 px images.
Each (method, seed) evaluates a freshly initialised learner (the seed's own random prompts stand in for trained
ones: evaluation costs the same) on the base classes' and then the new classes' test images, through the same
``evaluate_split`` the CLI's base2new runs. Without the store every evaluation decodes and encodes its images;
with it (starting from an empty store, so the one-time encoding and writing are timed too) the first
evaluation of each test set writes its features and the other five read them. The accuracies of both passes
must be identical.

Sizes (CPU): 10 classes x 20 images (4 test images per class: 20 base + 20 new test images), test batch 30;
on a GPU the dataset grows. Environment: FASTPROMPT_BENCH_FS_CLASSES / _IMAGES override the sizes.
"""
from __future__ import annotations

import dataclasses
import os
import time

import pytest
import torch

from benchmarks.conftest import record

METHODS = ("coop", "cocoop")
SEEDS = (1, 2, 3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, device):
    import fastprompt
    from fastprompt.datasets import make_synthetic_dataset

    cpu = device.type == "cpu"
    classes = int(os.environ.get("FASTPROMPT_BENCH_FS_CLASSES", 10 if cpu else 50))
    images = int(os.environ.get("FASTPROMPT_BENCH_FS_IMAGES", 20 if cpu else 50))
    root = tmp_path_factory.mktemp("bench-fs")
    make_synthetic_dataset(str(root / "data"), "caltech101", num_classes=classes, images_per_class=images,
                           image_size=224)
    torch.manual_seed(0)
    model, preprocess, tokenizer = fastprompt.load_clip("ViT-B-16", pretrained=None)
    return root, model.to(device=device, dtype=torch.float32).eval(), preprocess, tokenizer


def _protocol(root, model, preprocess, tokenizer, device, store):
    """Evaluate every (method, seed) on base then new; -> (seconds, images evaluated, accuracies)."""
    import fastprompt
    from fastprompt.training.config import TrainConfig
    from fastprompt.training.runner import evaluate_split, load_splits

    cfg = TrainConfig(method="coop", test_batch_size=30, num_workers=0, progress=False, precision="fp32",
                      device=str(device))
    parts = {part: load_splits("caltech101", str(root / "data"), -1, 1, part) for part in ("base", "new")}
    accuracies, images = [], 0
    start = time.perf_counter()
    for method in METHODS:
        for seed in SEEDS:
            torch.manual_seed(seed)
            learner = fastprompt.create_learner(method, model, parts["base"].classnames, tokenizer=tokenizer)
            learner = learner.to(device)
            for part, splits in parts.items():
                result = evaluate_split(learner, splits, dataclasses.replace(cfg, subsample=part), preprocess,
                                        "test", store)
                accuracies.append((method, seed, part, result["correct"], result["total"]))
                images += result["total"]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, images, accuracies


def test_base2new_eval_with_feature_store(benchmark, setup, device):
    from PIL import Image

    from fastprompt.training.feature_store import FeatureStore

    root, model, preprocess, tokenizer = setup
    for dirpath, _, files in os.walk(root / "data"):  # both passes find the images in the OS file cache
        for name in files:
            if name.endswith(".jpg"):
                with Image.open(os.path.join(dirpath, name)) as img:
                    img.load()
    plain_s, n, plain = _protocol(root, model, preprocess, tokenizer, device, None)
    store = FeatureStore(str(root / "store"))
    out = {}

    def with_store():  # one round: a second would start from a full store
        out["run"] = _protocol(root, model, preprocess, tokenizer, device, store)

    benchmark.pedantic(with_store, rounds=1, warmup_rounds=0)
    store_s, n2, stored = out["run"]
    assert stored == plain and n2 == n  # identical results with and without the store
    assert (store.misses, store.hits) == (2, 2 * len(METHODS) * len(SEEDS) - 2)
    info = {"case": f"base2new eval {'+'.join(METHODS)} x {len(SEEDS)} seeds", "images": n,
            "device": str(device), "dtype": "float32",
            "no_store_s": plain_s, "store_s": store_s, "speedup": plain_s / store_s,
            "no_store_img_per_s": n / plain_s, "store_img_per_s": n / store_s}
    benchmark.extra_info.update(info)
    record(info)
