"""Dassl's per-epoch learning rate (constant warm-up, then cosine per epoch), alone and inside the Trainer."""
from __future__ import annotations

import math

import pytest
import torch

from fastprompt.training import EpochLRSchedule, Trainer, dassl_lr
from fastprompt.training.schedule import vpt_lr
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


# ---------------------------------------------------------------------- VPT / VAPT: linear warm-up, then cosine
def test_vpt_schedule_values_from_the_formula():
    """VPT's WarmupCosineSchedule stepped once per epoch (W = 10, E = 100): 0 at epoch 0, linear to the base lr
    at epoch W, then 0.5 * (1 + cos(pi * (e - W) / (E - W)))."""
    E, W, lr0 = 100, 10, 1.25
    assert vpt_lr(0, lr0, E, W) == 0.0  # the first epoch trains at lr 0 (momentum still accumulates)
    assert vpt_lr(5, lr0, E, W) == pytest.approx(lr0 * 5 / 10, rel=1e-15)
    assert vpt_lr(9, lr0, E, W) == pytest.approx(lr0 * 0.9, rel=1e-15)
    assert vpt_lr(10, lr0, E, W) == lr0  # cosine starts at the full lr
    assert vpt_lr(55, lr0, E, W) == pytest.approx(lr0 * 0.5, rel=1e-12)  # half way through the cosine
    assert vpt_lr(99, lr0, E, W) == pytest.approx(lr0 * 0.5 * (1 + math.cos(math.pi * 89 / 90)), rel=1e-12)
    assert 0 < vpt_lr(99, lr0, E, W) < 1e-3 * lr0
    assert vpt_lr(3, lr0, 4, 0) == pytest.approx(lr0 * 0.5 * (1 + math.cos(math.pi * 3 / 4)), rel=1e-15)  # no warm-up


def test_vpt_schedule_matches_a_lambda_lr_stepped_per_epoch():
    """The whole curve against torch's LambdaLR with VPT's lambda, stepped after each epoch as VPT's trainer does."""
    E, W, lr0 = 23, 4, 0.3

    def lam(step):  # KMnP/vpt WarmupCosineSchedule.lr_lambda, cycles = 0.5
        if step < W:
            return step / max(1.0, W)
        progress = (step - W) / max(1, E - W)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2.0 * 0.5 * progress)))

    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=lr0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    expected = []
    for _ in range(E):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = EpochLRSchedule(torch.optim.SGD([p], lr=lr0), max_epoch=E, warmup_epoch=W, kind="warmup_cosine")
    assert [ours.set_epoch(e)[0] for e in range(E)] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    with pytest.raises(ValueError, match="lr schedule"):
        EpochLRSchedule(opt, max_epoch=E, kind="step")
    dassl = EpochLRSchedule(torch.optim.SGD([p], lr=lr0), max_epoch=E, warmup_epoch=W)
    with pytest.raises(ValueError, match="kind"):
        dassl.load_state_dict(ours.state_dict())  # a checkpoint of the other schedule is refused


def test_trainer_runs_vpt_schedule_with_batch_scaled_lr(tmp_path):
    """lr_batch_scaling: the groups start from lr * batch / 256 and follow the warm-up cosine per epoch."""
    E, W, lr0, B = 5, 2, 8.0, 3
    learner = make_coop(n_ctx=2)
    cfg = train_config(epochs=E, lr=lr0, batch_size=B, warmup_epoch=W, lr_scheduler="warmup_cosine",
                       lr_batch_scaling=True)
    history = Trainer(learner, NoisyTensorDataset(6, 5), cfg, output_dir=str(tmp_path)).fit()
    base = lr0 * B / 256
    assert history[0]["base_lr"] == base
    lrs = [h["lr"][0] for h in history if h["event"] == "epoch"]
    assert lrs == pytest.approx([0.0, base / 2, base] + [base * 0.5 * (1 + math.cos(math.pi * k / 3)) for k in (1, 2)],
                                rel=1e-14, abs=0)
