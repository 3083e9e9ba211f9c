"""Every registered learner trains one epoch of the Trainer on a tiny CLIP and a synthetic dataset.

What each learner needs beyond ``create_learner(method, clip, classnames)`` on a toy model is in ``SETUPS``:
prompt depth <= the towers' layers (deep-prompt learners), fewer tokens (speed only), ``top_k`` <= the number of
classes (DPC) and the training images' ``DatasetSplits`` (DPC's hard-negative library, DAPT's prototypes,
both built by ``attach_train_data``), and for SoftCPT a multi-task class list with *global* labels (the
trainer feeds ``(images, labels)`` only; SoftCPT's ``compute_loss(images, labels)`` takes global class
columns when no task ids are given, so the synthetic dataset's 4 classes are read as 2 tasks x 2 classes).
"""
from __future__ import annotations

import pytest
import torch

import fastprompt
from fastprompt.training import Trainer
from fastprompt.training.data import DatumDataset, train_transform
from tests.training.helpers import train_config

NUM_CLASSES = 4

# method -> (learner options, needs the DatasetSplits)
SETUPS = {
    "coop": ({"n_ctx": 2}, False),
    "cocoop": ({"n_ctx": 2}, False),
    "kgcoop": ({}, False),
    "prograd": ({}, False),
    "dept": ({"base_config": {"n_ctx": 2}}, False),
    "capt": ({}, False),
    "decapt": ({}, False),
    "maple": ({"prompt_depth": 2}, False),
    "ivlp": ({"prompt_depth_text": 2, "prompt_depth_vision": 2}, False),
    "promptsrc": ({"n_ctx_text": 2, "n_ctx_vision": 2, "prompt_depth_text": 2, "prompt_depth_vision": 2}, False),
    "dapt": ({"vis_num_tokens": 2, "txt_num_tokens": 2}, True),
    "dpc": ({"top_k": 2, "seed": 0, "backbone_config": {"n_ctx": 2}}, True),
    "vpt": ({"num_tokens": 2, "deep": True}, False),
    "vapt": ({"num_tokens": 2}, False),
    "softcpt": ({"tasknames": ["animals", "things"], "n_ctx": 2, "task_n_ctx": 2}, False),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fastprompt.datasets import build_dataset, make_synthetic_dataset
    from tests.conftest import tiny_clip

    root = tmp_path_factory.mktemp("synth_all")
    make_synthetic_dataset(str(root), "caltech101", num_classes=NUM_CLASSES, images_per_class=5)
    splits = build_dataset("caltech101", str(root), shots=2, seed=1)
    clip = tiny_clip(dtype=torch.float32)  # 2 vision + 3 text layers, 32 px
    return splits, DatumDataset(splits.train_x, train_transform(clip))


def test_every_registered_learner_has_a_setup():
    assert set(SETUPS) == set(fastprompt.list_learners())


@pytest.mark.parametrize("method", sorted(SETUPS))
def test_one_epoch(method, setup, tmp_path):
    if method not in fastprompt.list_learners():
        pytest.skip(f"{method} is not registered in this checkout")
    from tests.conftest import tiny_clip

    splits, train_set = setup
    clip = tiny_clip(dtype=torch.float32)  # a fresh one: no learner can leak changes into the next
    options, needs_splits = SETUPS[method]
    names = splits.classnames
    if method == "softcpt":
        names = [names[: NUM_CLASSES // 2], names[NUM_CLASSES // 2 :]]  # global label c = column c
    torch.manual_seed(0)
    learner = fastprompt.create_learner(method, clip, names, config=dict(options))
    before = {k: v.clone() for k, v in learner.trainable_state_dict().items()}
    cfg = train_config(method=method, epochs=1, batch_size=4, lr=0.01, warmup_epoch=0, lr_scheduler="cosine",
                       lr_batch_scaling=False)
    history = Trainer(learner, train_set, cfg, output_dir=str(tmp_path), splits=splits if needs_splits else None).fit()
    epoch = [h for h in history if h["event"] == "epoch"]
    assert len(epoch) == 1 and epoch[0]["images"] == len(splits.train_x)
    assert torch.isfinite(torch.tensor(epoch[0]["loss"]))
    after = learner.trainable_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "no trainable tensor moved"
    assert (tmp_path / "checkpoint.pt").is_file()
    learner.eval()
    with torch.no_grad():
        images = torch.stack([train_set[i][0] for i in range(2)])
        logits = learner(images)
    assert logits.shape[0] == 2 and torch.isfinite(logits[logits > -float("inf")]).all()
