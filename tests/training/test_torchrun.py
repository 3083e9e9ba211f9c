"""A real ``torchrun`` launch of ``fastprompt train --class-sharding`` (2 gloo processes on the CPU) == one process
with the same global batch: the trained prompt tensors, every epoch's logged loss and the test accuracy.

Exactness needs the two runs to see the same pixels. The CLI's training transform is Dassl's random
resized crop + flip, and each rank draws its augmentation from its own seed (so ranks do not augment alike),
so with ordinary images the runs would only agree statistically. Here every image is one uniform colour: any
crop of it, resized, and its mirror image are the same uniform image (checked below, on these very files), so
the augmentation is a no-op and the comparison can be exact (float64 model: <= 1e-10, all-reduce order only).
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import rel_err
from tests.training.test_cli_train import TINY

WORLD = 2
PER_RANK_BATCH = 2
EPOCHS = 2


def _uniform_colour_dataset(root: str) -> None:
    """A caltech101-layout synthetic dataset (4 classes, 8 images each) whose images are then overwritten with
    one uniform colour per image (class-dependent mean, so the task is learnable), as JPEG like the originals."""
    from PIL import Image

    from fastprompt.datasets import make_synthetic_dataset

    make_synthetic_dataset(root, "caltech101", num_classes=4, images_per_class=8)
    rng = np.random.default_rng(5)
    paths = sorted(glob.glob(os.path.join(root, "**", "*.jpg"), recursive=True))
    assert len(paths) == 32
    for path in paths:
        label = sorted(os.listdir(os.path.dirname(os.path.dirname(path)))).index(os.path.basename(os.path.dirname(path)))
        colour = np.clip(np.array([60 * label, 255 - 60 * label, 128]) + rng.integers(-25, 26, 3), 0, 255)
        Image.new("RGB", (32, 32), tuple(int(c) for c in colour)).save(path, format="JPEG")


def _assert_augmentation_is_a_noop(root: str) -> None:
    """The premise of exactness: on these files the random training transform always returns the test one."""
    from PIL import Image

    from fastprompt.datasets import clip_transforms

    train_t, test_t = clip_transforms(32, train=True), clip_transforms(32, train=False)
    torch.manual_seed(0)
    for path in sorted(glob.glob(os.path.join(root, "**", "*.jpg"), recursive=True))[:8]:
        with Image.open(path) as img:
            img = img.convert("RGB")
        ref = test_t(img)
        for _ in range(10):
            assert torch.equal(train_t(img), ref), path


def _argv(model: str, root: str, out: str, batch: int):
    return ["train", "--method", "coop", "--dataset", "caltech101", "--model", model, "--pretrained", "none",
            "--root", root, "--shots", "2", "--device", "cpu", "--num-workers", "0", "--no-progress",
            "--precision", "fp64", "--epochs", str(EPOCHS), "--batch-size", str(batch), "--lr", "0.05",
            "--class-sharding", "--output-dir", out, "--opts", "TRAINER.COOP.N_CTX", "2"]


def _read_run(out: str):
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(out, "adapter", "prompt_learner.safetensors"))
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    return tensors, log, results


def test_torchrun_class_sharding_matches_one_process(tmp_path):
    model = tmp_path / "fp-torchrun-tiny.json"
    model.write_text(json.dumps(TINY))
    root = str(tmp_path / "data")
    _uniform_colour_dataset(root)
    _assert_augmentation_is_a_noop(root)

    # Two processes x 2 images (class-sharded text encoding, gradients all-reduced) under torchrun.
    multi = str(tmp_path / "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           "-m", "fastprompt.cli"] + _argv(str(model), root, multi, PER_RANK_BATCH)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"

    # One process with the global batch (4). --class-sharding is a no-op in one process.
    from fastprompt.cli import main

    single = str(tmp_path / "single")
    assert main(_argv(str(model), root, single, WORLD * PER_RANK_BATCH)) == 0

    t_multi, log_multi, res_multi = _read_run(multi)
    t_single, log_single, res_single = _read_run(single)
    start = [r for r in log_multi if r["event"] == "start"][0]
    assert start["world_size"] == WORLD and start["train_images"] == 8  # 4 classes x 2 shots: 2 steps per epoch
    assert [r for r in log_single if r["event"] == "start"][0]["world_size"] == 1

    assert sorted(t_multi) == sorted(t_single) == ["ctx"]
    ctx0 = None
    for name in t_single:
        assert t_multi[name].dtype == torch.float64
        assert rel_err(t_multi[name], t_single[name]) <= 1e-10, name
        ctx0 = t_single[name]
    # It trained: the prompts moved away from their seeded initialisation (same seed -> same init in both).
    from fastprompt.learners import create_learner
    from fastprompt.training.runner import build_clip
    from fastprompt.training.trainer import seed_everything

    clip, _, tok = build_clip(str(model), "none", torch.device("cpu"), "fp64")
    seed_everything(res_single["seed"])
    init = create_learner("coop", clip, ["a", "b"], config={"n_ctx": 2}, tokenizer=tok).ctx.detach()
    assert init.shape == ctx0.shape
    assert rel_err(ctx0 - init, init) > 1e-6

    epochs_multi = [r for r in log_multi if r["event"] == "epoch"]
    epochs_single = [r for r in log_single if r["event"] == "epoch"]
    assert len(epochs_multi) == len(epochs_single) == EPOCHS
    for a, b in zip(epochs_multi, epochs_single):
        assert a["images"] == b["images"] == 8
        assert a["lr"] == b["lr"]
        assert abs(a["loss"] - b["loss"]) <= 1e-10 * abs(b["loss"]), (a["loss"], b["loss"])
    assert res_multi["finished"] and res_single["finished"]
    assert res_multi["accuracy"] == pytest.approx(res_single["accuracy"], abs=1e-9)
