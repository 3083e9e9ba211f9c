"""Fault injection on saves: writers killed with SIGKILL at random instants, and writers racing each other.

The writers are forked children of the test process (torch already imported, so each one starts in
microseconds), killed with a real ``SIGKILL``. After every kill the adapter on disk must load as one whole save:
its config and its weights from the same ``write_adapter`` call.
"""
from __future__ import annotations

import os
import random
import signal
import time

import pytest
import torch

from fastprompt.learners._common import load_pretrained_tensors, read_pretrained, write_adapter
from fastprompt.training.checkpoint import save_checkpoint

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


# ~1 MB of weights, so a kill often lands inside a write. Built here, in the parent: a forked child must not
# start torch's intra-op thread pool (not fork-safe), so it only serialises tensors that exist already.
PAYLOAD = torch.randn(64, 4096)


def _save(directory: str, step: int) -> None:
    """One save whose config and weights both record ``step``."""
    write_adapter(directory, {"method": "coop", "config": {"step": step}},
                  {"ctx": PAYLOAD, "step": torch.tensor([step], dtype=torch.int64)})


def _fork(target) -> int:
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            target()
        except BaseException:  # noqa: BLE001 - any failure of the child is its exit status
            code = 1
        os._exit(code)
    return pid


def _assert_whole(directory: str) -> int:
    step = read_pretrained(directory)["config"]["step"]
    weights = load_pretrained_tensors(directory)
    assert int(weights["step"]) == step, f"config of save {step} beside the weights of save {int(weights['step'])}"
    assert torch.equal(weights["ctx"], PAYLOAD)
    return step


def test_adapter_survives_sigkill_at_any_instant(tmp_path):
    directory = str(tmp_path / "adapter")
    _save(directory, 0)
    rng = random.Random(0)
    steps_seen = set()
    for kill in range(24):
        def loop(first=1000 * (kill + 1)):
            for k in range(first, first + 1000):
                _save(directory, k)

        pid = _fork(loop)
        time.sleep(rng.uniform(0.005, 0.12))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        steps_seen.add(_assert_whole(directory))
    assert len(steps_seen) > 1  # the kills did interrupt live saving, not an idle child
    _save(directory, -1)  # a later save removes the temporary files of the killed writers
    assert sorted(os.listdir(directory)) == ["fastprompt_config.json", "prompt_learner.safetensors"]
    assert _assert_whole(directory) == -1


def test_concurrent_adapter_saves_do_not_collide(tmp_path):
    directory = str(tmp_path / "adapter")
    _save(directory, 0)

    def writer(base):
        return lambda: [_save(directory, base + k) for k in range(40)]

    pids = [_fork(writer(1000)), _fork(writer(2000))]
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    assert codes == [0, 0]  # neither writer crashed on the other's temporary file
    assert _assert_whole(directory) in {1039, 2039}
    assert sorted(os.listdir(directory)) == ["fastprompt_config.json", "prompt_learner.safetensors"]


def test_killed_checkpoint_writers_leave_no_orphans(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    big = {"x": PAYLOAD}
    rng = random.Random(1)
    for kill in range(12):
        pid = _fork(lambda: [save_checkpoint(path, dict(big, epoch=k)) for k in range(1000)])  # noqa: B023
        time.sleep(rng.uniform(0.005, 0.1))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    save_checkpoint(path, dict(big, epoch=-1))
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no checkpoint.pt.tmp.<pid> of a killed writer is left
    assert torch.load(path, weights_only=True)["epoch"] == -1


def test_orphan_cleanup_spares_live_writers(tmp_path):
    from fastprompt.io.atomic import clean_orphans

    path = str(tmp_path / "checkpoint.pt")
    dead = _fork(lambda: None)
    os.waitpid(dead, 0)
    for name in (f"checkpoint.pt.tmp.{dead}", f"checkpoint.pt.tmp.{dead}.ab12cd34", f"checkpoint.pt.tmp.{os.getpid()}.ff"):
        (tmp_path / name).write_bytes(b"partial")
    removed = clean_orphans(path)
    assert sorted(os.path.basename(p) for p in removed) == [f"checkpoint.pt.tmp.{dead}", f"checkpoint.pt.tmp.{dead}.ab12cd34"]
    assert (tmp_path / f"checkpoint.pt.tmp.{os.getpid()}.ff").exists()  # ours: alive, kept


def test_damaged_adapter_files_are_named(tmp_path):
    directory = str(tmp_path / "adapter")
    _save(directory, 3)
    weights = os.path.join(directory, "prompt_learner.safetensors")
    data = open(weights, "rb").read()
    with open(weights, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="prompt_learner.safetensors are damaged or truncated"):
        read_pretrained(directory)
    with pytest.raises(ValueError, match="prompt_learner.safetensors are damaged or truncated"):
        load_pretrained_tensors(directory)
    os.remove(weights)
    config = os.path.join(directory, "fastprompt_config.json")
    text = open(config).read()
    with open(config, "w") as f:
        f.write(text[: len(text) // 2])
    with pytest.raises(ValueError, match="fastprompt_config.json is damaged or truncated"):
        read_pretrained(directory)
