"""Non-finite options and losses stop a run clearly without writing results; resume is exact whatever
``--num-workers`` the resumed run uses (augmentation randomness is per sample, not per worker)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.data import Dataset

from fastprompt.cli import main
from fastprompt.training import Trainer, load_checkpoint
from tests.training.helpers import NoisyTensorDataset, make_coop, train_config

TINY = {"embed_dim": 32, "vision_cfg": {"layers": 1, "width": 32, "head_width": 16, "patch_size": 16, "image_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from fastprompt.datasets import make_synthetic_dataset

    base = tmp_path_factory.mktemp("rel")
    model = base / "fp-rel-tiny.json"
    model.write_text(json.dumps(TINY))
    root = base / "data"
    make_synthetic_dataset(str(root), "caltech101", num_classes=3, images_per_class=4)
    return str(model), str(root)


def _argv(env, out, *extra):
    model, root = env
    return (["train", "--dataset", "caltech101", "--model", model, "--pretrained", "none", "--root", root,
             "--device", "cpu", "--num-workers", "0", "--no-progress", "--shots", "2", "--epochs", "2",
             "--batch-size", "2", "--output-dir", str(out)] + list(extra))


@pytest.mark.parametrize("option, named", [
    (["--lr", "inf"], "--lr / OPTIM.LR must be finite"),
    (["--lr", "nan"], "--lr / OPTIM.LR must be finite"),
    (["--lr", "-0.1"], "--lr / OPTIM.LR must be > 0"),
    (["--epochs", "-1"], "--epochs / OPTIM.MAX_EPOCH must be >= 1"),
    (["--batch-size", "0"], "--batch-size / DATALOADER.TRAIN_X.BATCH_SIZE must be >= 1"),
    (["--num-workers", "-2"], "--num-workers must be >= 0"),
    (["--opts", "OPTIM.WEIGHT_DECAY", "-1"], "OPTIM.WEIGHT_DECAY"), (["--opts", "OPTIM.LR", "inf"], "OPTIM.LR"),
    (["--opts", "OPTIM.MOMENTUM", "nan"], "OPTIM.MOMENTUM"), (["--opts", "TRAINER.COOP.N_CTX", "-3"], "n_ctx must be >= 0"),
    (["--opts", "TRAINER.COOP.INIT_STD", "nan"], "INIT_STD"), (["--device", "tpu"], "--device must be"),
])
def test_bad_numbers_are_refused_before_anything_runs(env, tmp_path, capsys, option, named):
    out = tmp_path / "out"
    assert main(_argv(env, out, *option)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and named in err, err
    assert not out.exists()


def test_huge_lr_stops_with_a_clear_error_and_writes_no_results(env, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_argv(env, out, "--lr", "1e30")) == 1
    err = capsys.readouterr().err
    # Epoch 1 runs at Dassl's constant warm-up lr (1e-5); epoch 2 at 1e30 diverges.
    assert "training diverged in epoch 2: the loss is nan" in err and "lower --lr" in err
    assert not (out / "adapter").exists() and not (out / "results.json").exists()
    assert load_checkpoint(str(out / "checkpoint.pt"))["epoch"] == 1  # the last good epoch is kept


class _PoisonAfter(Dataset):
    """NoisyTensorDataset whose images become NaN once ``poisoned`` is set (a divergence in epoch 2)."""

    def __init__(self):
        self.data, self.poisoned = NoisyTensorDataset(6, 5), False

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        image, label = self.data[i]
        return (image * math.nan if self.poisoned else image), label


def test_divergence_keeps_the_last_good_checkpoint(tmp_path):
    from fastprompt.training.guards import TrainingDiverged

    data = _PoisonAfter()
    learner = make_coop(n_ctx=2)
    learner.on_epoch_end = lambda epoch, max_epoch: setattr(data, "poisoned", True)
    trainer = Trainer(learner, data, train_config(epochs=3), output_dir=str(tmp_path))
    with pytest.raises(TrainingDiverged, match="diverged in epoch 2.*checkpoint.pt \\(after epoch 1\\) is kept"):
        trainer.fit()
    good = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert good["epoch"] == 1 and all(torch.isfinite(t).all() for t in good["trainable"].values())


def test_resume_with_other_num_workers_is_bit_exact(env, tmp_path):
    """Real image files with random crops/flips: an uninterrupted run with 0 workers, and a run stopped after
    epoch 1 then resumed with 2 workers, end with bit-identical prompts."""
    from fastprompt.learners._common import load_pretrained_tensors
    from fastprompt.training.config import TrainConfig
    from fastprompt.training.runner import train_run

    model, root = env

    def cfg(out, workers):
        return TrainConfig(method="coop", model=model, pretrained=None, dataset="caltech101", root=root, shots=2,
                           epochs=2, batch_size=2, lr=0.01, device="cpu", num_workers=workers, progress=False,
                           output_dir=str(tmp_path / out), learner={"n_ctx": 2})

    train_run(cfg("full", 0))
    train_run(cfg("cut", 0), stop_after_epoch=1)
    train_run(cfg("cut", 2), resume=True)
    a = load_pretrained_tensors(str(tmp_path / "full" / "adapter"))
    b = load_pretrained_tensors(str(tmp_path / "cut" / "adapter"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
