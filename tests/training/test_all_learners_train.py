"""Every registered learner trains one epoch of the Trainer on a tiny CLIP and a synthetic dataset.

What each learner needs beyond ``create_learner(method, clip, classnames)`` on a toy model is in
``tests.learner_setups.SETUPS`` (shared with ``tests/learners/test_gpu_learners.py``; see its docstring).
"""
from __future__ import annotations

import pytest
import torch

import fastprompt
from fastprompt.training import Trainer
from fastprompt.training.data import DatumDataset, train_transform
from tests.learner_setups import SETUPS, learner_classnames, synthetic_splits
from tests.training.helpers import train_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.conftest import tiny_clip

    splits = synthetic_splits(tmp_path_factory.mktemp("synth_all"))
    clip = tiny_clip(dtype=torch.float32)  # 2 vision + 3 text layers, 32 px
    return splits, DatumDataset(splits.train_x, train_transform(clip))


def test_every_registered_learner_has_a_setup():
    assert set(SETUPS) == set(fastprompt.list_learners())


@pytest.mark.parametrize("method", sorted(SETUPS))
def test_one_epoch(method, setup, tmp_path):
    from tests.conftest import tiny_clip

    splits, train_set = setup
    clip = tiny_clip(dtype=torch.float32)  # a fresh one: no learner can leak changes into the next
    options, needs_splits = SETUPS[method]
    names = learner_classnames(method, splits.classnames)  # SoftCPT: 2 tasks x 2 classes, global labels
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
