"""Two processes racing on one run directory: the second refuses, naming the holder; death releases the lock."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from fastprompt.cli import main
from fastprompt.training.rundir import LOCK_FILE, RunDirLocked, lock_run_dir

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _hold_lock(directory: str):
    """Fork a child that takes the lock of ``directory`` and sleeps; returns its pid once it holds the lock."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            with lock_run_dir(directory):
                os.write(ready_w, b"1")
                time.sleep(60)
        finally:
            os._exit(0)
    assert os.read(ready_r, 1) == b"1"
    os.close(ready_r)
    os.close(ready_w)
    return pid


def test_second_writer_refuses_and_names_the_holder(tmp_path):
    run = str(tmp_path / "run")
    pid = _hold_lock(run)
    try:
        with pytest.raises(RunDirLocked, match=f"pid {pid} on .*started .*command:"):
            with lock_run_dir(run):
                pass
    finally:
        os.kill(pid, signal.SIGKILL)  # the OS releases the lock of a killed holder
        os.waitpid(pid, 0)
    with lock_run_dir(run):
        info = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert info["pid"] == os.getpid()
    assert os.listdir(run) == []  # released: the lock file (left by the killed holder too) is gone


def test_cli_train_into_a_locked_output_dir_refuses(tmp_path, capsys):
    run = str(tmp_path / "run")
    pid = _hold_lock(run)
    try:
        for argv in (["train", "--dataset", "caltech101"], ["base2new", "--dataset", "caltech101"]):
            code = main(argv + ["--root", str(tmp_path), "--output-dir", run, "--device", "cpu"])
            err = capsys.readouterr().err
            assert code == 2 and f"{run} is in use by another fastprompt run (pid {pid}" in err
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_lock_is_reentrant_within_a_process(tmp_path):
    run = str(tmp_path / "run")
    with lock_run_dir(run):
        with lock_run_dir(run):  # base2new's root, then a nested call on the same directory
            pass
        assert (tmp_path / "run" / LOCK_FILE).exists()
