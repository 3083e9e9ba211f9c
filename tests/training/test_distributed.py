"""Two gloo processes with class-sharded text encoding == one process: loss, gradients, and a short training run."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import rel_err
from tests.training.helpers import NoisyTensorDataset, make_coop, train_config

WORLD = 2
N_IMAGES = 8  # global batch 4 = 2 ranks x 2 images; two steps per epoch


def _step(learner, images, labels, sharded: bool):
    from fastprompt.training.distributed import average_gradients, sharded_compute_loss

    learner.zero_grad(set_to_none=True)
    loss, logits = (sharded_compute_loss if sharded else type(learner).compute_loss)(learner, images, labels)
    loss.backward()
    average_gradients([p for p in learner.parameters() if p.requires_grad])
    return loss.detach(), logits.detach()


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    from fastprompt.training import Trainer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        # noise=0: per-rank augmentation randomness legitimately differs from one process's.
        data = NoisyTensorDataset(N_IMAGES, 5, seed=3, noise=0.0)
        images, labels = data.images[:4], data.labels[:4]
        mine = slice(2 * rank, 2 * rank + 2)
        out = {}
        for csc in (False, True):
            learner = make_coop(seed=11, n_ctx=3, csc=csc)  # 5 classes -> shards of 3 and 2
            loss, logits = _step(learner, images[mine], labels[mine], sharded=True)
            mean_loss = loss.clone()
            dist.all_reduce(mean_loss)
            out[f"loss_csc{csc}"] = mean_loss / WORLD
            out[f"logits_csc{csc}"] = logits
            out[f"grad_csc{csc}"] = learner.ctx.grad.clone()
        # A short class-sharded training run (2 epochs x 2 steps) under the real Trainer.
        learner = make_coop(seed=11, n_ctx=3)
        cfg = train_config(epochs=2, batch_size=2, class_sharding=True)
        Trainer(learner, data, cfg).fit()
        out["trained_ctx"] = learner.ctx.detach().clone()
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_class_sharding_matches_one_process(tmp_path):
    from fastprompt.training import Trainer

    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    data = NoisyTensorDataset(N_IMAGES, 5, seed=3, noise=0.0)
    images, labels = data.images[:4], data.labels[:4]
    for csc in (False, True):
        learner = make_coop(seed=11, n_ctx=3, csc=csc)
        loss, logits = _step(learner, images, labels, sharded=False)
        for r, out in enumerate(ranks):
            assert rel_err(out[f"loss_csc{csc}"], loss) <= 1e-10
            assert rel_err(out[f"logits_csc{csc}"], logits[2 * r : 2 * r + 2]) <= 1e-10
            assert rel_err(out[f"grad_csc{csc}"], learner.ctx.grad) <= 1e-10
        assert learner.ctx.grad.abs().sum() > 0

    # One process with the global batch (4) takes the same steps as 2 ranks x 2 (same global order).
    learner = make_coop(seed=11, n_ctx=3)
    Trainer(learner, data, train_config(epochs=2, batch_size=4)).fit()
    start = make_coop(seed=11, n_ctx=3).ctx.detach()
    assert rel_err(learner.ctx.detach() - start, start) > 1e-6  # it trained
    for out in ranks:
        assert rel_err(out["trained_ctx"], learner.ctx.detach()) <= 1e-10


def test_sharding_support_is_checked():
    import fastprompt
    from fastprompt.training.distributed import shard_slice, supports_class_sharding
    from tests.conftest import tiny_clip

    assert supports_class_sharding(make_coop()) is None
    cocoop = fastprompt.create_learner("cocoop", tiny_clip(), ["a", "b"])
    assert "text_features_for" in supports_class_sharding(cocoop)
    slices = [shard_slice(5, r, 2) for r in range(2)]
    assert [(s.start, s.stop) for s in slices] == [(0, 3), (3, 5)]
    assert [shard_slice(7, r, 3) for r in range(3)] == [slice(0, 3), slice(3, 5), slice(5, 7)]
