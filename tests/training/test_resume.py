"""Checkpoints: exact resume after an interrupt, learnable-only contents, clear errors that lose nothing."""
from __future__ import annotations

import os

import pytest
import torch

from fastprompt.training import CheckpointError, EpochBatchSampler, Trainer, load_checkpoint
from tests.training.helpers import NoisyTensorDataset, make_coop, train_config


def _fit(directory, stop=None, resume=False, seed=0, **cfg):
    learner = make_coop(seed=seed, n_ctx=2)
    Trainer(learner, NoisyTensorDataset(7, 5), train_config(**cfg), output_dir=str(directory)).fit(
        resume=resume, stop_after_epoch=stop)
    return learner


def test_resume_after_interrupt_is_bit_exact(tmp_path):
    full = _fit(tmp_path / "full")
    _fit(tmp_path / "cut", stop=2)  # "killed" after epoch 2
    assert load_checkpoint(str(tmp_path / "cut" / "checkpoint.pt"))["epoch"] == 2
    # A fresh process: different random init, so only the checkpoint can make it right.
    resumed = _fit(tmp_path / "cut", resume=True, seed=123)
    assert torch.equal(resumed.ctx.detach(), full.ctx.detach())
    a = load_checkpoint(str(tmp_path / "full" / "checkpoint.pt"))
    b = load_checkpoint(str(tmp_path / "cut" / "checkpoint.pt"))
    assert a["epoch"] == b["epoch"] == 4
    assert torch.equal(a["optimizer"]["state"][0]["momentum_buffer"], b["optimizer"]["state"][0]["momentum_buffer"])
    losses = lambda p: [h["loss"] for h in p["history"] if h["event"] == "epoch"]  # noqa: E731
    assert losses(a) == losses(b)


def test_checkpoint_holds_only_learnable_tensors(tmp_path):
    learner = _fit(tmp_path, epochs=1)
    payload = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert set(payload["trainable"]) == {"ctx"}
    assert torch.equal(payload["trainable"]["ctx"], learner.ctx.detach())
    n_clip = sum(p.numel() for p in learner.clip.parameters())
    assert os.path.getsize(tmp_path / "checkpoint.pt") < n_clip * 8 / 4  # far smaller than the frozen CLIP
    assert payload["train_config"]["lr"] == 0.05 and payload["learner_config"]["n_ctx"] == 2
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # atomic write leaves no temporaries


def test_existing_checkpoint_is_never_overwritten(tmp_path):
    _fit(tmp_path, epochs=1)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(FileExistsError, match="checkpoint.pt"):
        _fit(tmp_path, epochs=1)
    # a mismatched run (other n_ctx) cannot resume from it
    learner = make_coop(n_ctx=3)
    with pytest.raises(CheckpointError, match="checkpoint.pt.*learner config"):
        Trainer(learner, NoisyTensorDataset(7, 5), train_config(epochs=1), output_dir=str(tmp_path)).fit(resume=True)
    with pytest.raises(CheckpointError, match="settings differ"):
        _fit(tmp_path, resume=True, epochs=1, lr=0.1)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError, match=r"checkpoint.pt is corrupt"):
        _fit(tmp_path, resume=True)
    assert path.read_bytes() == b"\x00not a checkpoint"
    torch.save({"format": "something else"}, path)
    with pytest.raises(CheckpointError, match="not a fastprompt training checkpoint"):
        load_checkpoint(str(path))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(tmp_path, precision):
    """Autocast on an fp32 model; fp16 goes through a GradScaler whose state is checkpointed."""
    import fastprompt
    from tests.conftest import tiny_clip

    # Reference backend: the fast engine's custom ops do not take autocast's mixed dtypes yet (see report).
    learner = fastprompt.create_learner("coop", tiny_clip(dtype=torch.float32), ["a", "b", "c"], n_ctx=2,
                                        backend="reference")
    data = NoisyTensorDataset(4, 3, dtype=torch.float32)
    history = Trainer(learner, data, train_config(epochs=2, precision=precision, batch_size=2), str(tmp_path)).fit()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history if h["event"] == "epoch")
    scaler = load_checkpoint(str(tmp_path / "checkpoint.pt"))["scaler"]
    assert (scaler is not None) == (precision == "fp16")


def test_gradient_clipping_bounds_the_first_step():
    learner = make_coop(n_ctx=2)
    start = learner.ctx.detach().clone()
    cfg = train_config(epochs=1, warmup_epoch=0, weight_decay=0.0, batch_size=7, grad_clip=1e-3, lr=1.0)
    Trainer(learner, NoisyTensorDataset(7, 5), cfg).fit()
    # one SGD step, first momentum buffer = the clipped gradient: ||update|| = lr * ||g|| <= lr * clip
    assert 0 < float((learner.ctx.detach() - start).norm()) <= 1e-3 * (1 + 1e-9)


def test_batch_sampler_order_and_drop_last():
    s = EpochBatchSampler(10, 4, seed=1)
    s.set_epoch(0)
    batches = list(s)
    assert len(batches) == 2 and all(len(b) == 4 for b in batches)  # Dassl drops the incomplete last batch
    again = EpochBatchSampler(10, 4, seed=1)
    again.set_epoch(0)
    assert list(again) == batches  # a pure function of (seed, epoch)
    s.set_epoch(1)
    assert list(s) != batches
    tiny = EpochBatchSampler(3, 4, seed=1)
    assert [len(b) for b in tiny] == [3]  # fewer images than a batch: one short batch, as Dassl
    # two ranks together draw exactly the global batches of one process with the doubled batch size
    single = EpochBatchSampler(10, 4, seed=5)
    ranks = [EpochBatchSampler(10, 2, seed=5, rank=r, world_size=2) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == list(single)
    with pytest.raises(ValueError, match="global batch"):
        EpochBatchSampler(3, 2, rank=0, world_size=2)
    with pytest.raises(ValueError, match="empty"):
        EpochBatchSampler(0, 2)


@pytest.mark.parametrize("method", ["cocoop", "kgcoop"])
def test_other_learners_train_through_the_interface(tmp_path, method):
    """The trainer needs nothing but the PromptLearner interface: other methods train and resume too."""
    import fastprompt
    from tests.conftest import tiny_clip

    def fit(stop=None, resume=False):
        torch.manual_seed(0)
        learner = fastprompt.create_learner(method, tiny_clip(), ["cat", "dog", "car"])
        Trainer(learner, NoisyTensorDataset(4, 3), train_config(method=method, epochs=3, batch_size=2),
                output_dir=str(tmp_path / ("b" if stop or resume else "a"))).fit(resume=resume, stop_after_epoch=stop)
        return learner.trainable_state_dict()

    full = fit()
    fit(stop=1)
    resumed = fit(resume=True)
    assert set(full) == set(resumed) and all(torch.equal(full[k], resumed[k]) for k in full)
