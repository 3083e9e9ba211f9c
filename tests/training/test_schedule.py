"""Dassl's per-epoch learning rate (spec methods_coop_family.md §7.8), alone and inside the Trainer."""
from __future__ import annotations

import math

import pytest
import torch

from fastprompt.training import EpochLRSchedule, Trainer, dassl_lr
from tests.training.helpers import NoisyTensorDataset, make_coop, train_config


def test_spec_values():
    E, lr0 = 10, 0.002
    assert dassl_lr(0, lr0, E) == 1e-5  # constant warm-up epoch
    assert dassl_lr(1, lr0, E) == lr0  # epoch 1 at the full lr
    assert dassl_lr(E - 1, lr0, E) == pytest.approx(0.5 * lr0 * (1 + math.cos(math.pi * (E - 2) / E)), rel=1e-15)
    assert dassl_lr(E - 1, lr0, E) > 0  # never reaches 0
    assert dassl_lr(0, lr0, E, warmup_type="none") == lr0


def test_matches_torch_cosine_successor():
    """Dassl = a constant warm-up in front of torch's CosineAnnealingLR(T_max=E), recounted after the warm-up."""
    E, lr0 = 7, 0.0035
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr0)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=E)
    expected = [1e-5]
    for _ in range(E - 1):
        expected.append(opt.param_groups[0]["lr"])
        cosine.step()
    got = [dassl_lr(e, lr0, E) for e in range(E)]
    assert got == pytest.approx(expected, rel=1e-12, abs=0)


def test_staged_groups_follow_their_own_base_lr():
    a, b = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([{"params": [a], "lr": 0.002}, {"params": [b], "lr": 0.013}], lr=0.002)
    sched = EpochLRSchedule(opt, max_epoch=5)
    assert sched.set_epoch(0) == [1e-5, 1e-5]  # Dassl's warm-up sets every group to the constant
    for e in range(1, 5):
        lrs = sched.set_epoch(e)
        assert lrs == [dassl_lr(e, 0.002, 5), dassl_lr(e, 0.013, 5)]
        assert [g["lr"] for g in opt.param_groups] == lrs
    other = EpochLRSchedule(torch.optim.SGD([a], lr=0.1), max_epoch=5)
    with pytest.raises(ValueError, match="base_lrs"):
        other.load_state_dict(sched.state_dict())


def test_bad_inputs():
    with pytest.raises(ValueError, match="epoch must be in"):
        dassl_lr(5, 0.1, 5)
    with pytest.raises(ValueError, match="warmup_type"):
        dassl_lr(0, 0.1, 5, warmup_type="linear")
    with pytest.raises(ValueError, match="max_epoch"):
        dassl_lr(0, 0.1, 0)


def test_trainer_trains_each_epoch_at_the_formula(tmp_path):
    E, lr0 = 5, 0.03
    learner = make_coop(n_ctx=2)
    history = Trainer(learner, NoisyTensorDataset(6, 5), train_config(epochs=E, lr=lr0), output_dir=str(tmp_path)).fit()
    lrs = [h["lr"][0] for h in history if h["event"] == "epoch"]
    assert lrs == [1e-5] + [0.5 * lr0 * (1 + math.cos(math.pi * (e - 1) / E)) for e in range(1, E)]
    assert (tmp_path / "log.jsonl").read_text().count('"event": "epoch"') == E
