"""Console and logs: a line per epoch with the run's ETA, no warning on a default run, --tensorboard (optional
dependency), base2new saying what runs, run_config.json with absolute paths."""
from __future__ import annotations

import json
import os
import warnings


from fastprompt.training import TrainConfig
from fastprompt.training.console import EpochReporter, format_duration
from tests.training.helpers import NoisyTensorDataset, make_coop, train_config


def test_format_duration():
    assert (format_duration(9.4), format_duration(185), format_duration(3725)) == ("9s", "3m05s", "1h02m")


def test_runs_eta():
    from fastprompt.training.console import RunsETA

    eta = RunsETA(4)
    assert eta.text(4) == ""  # nothing trained yet: no estimate
    eta.add(30.0)
    eta.add(90.0)
    assert eta.text(2) == ", ETA of the rest 2m00s"  # mean 60 s x 2 runs left


def test_default_workers_fit_the_machine():
    assert 1 <= TrainConfig().num_workers <= min(4, os.cpu_count() or 1)


def test_epoch_lines_and_no_warnings(tmp_path, capsys):
    from fastprompt.training.trainer import Trainer

    learner = make_coop(n_ctx=2)
    data = NoisyTensorDataset(6, len(learner.classnames))
    cfg = train_config(epochs=3, progress=True, print_freq=2)  # 6 images, batch 3: one batch line per epoch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(learner, data, cfg, output_dir=str(tmp_path)).fit()
    ours = [w for w in caught if "fastprompt" in w.filename or "requires_grad" in str(w.message) or "worker" in str(w.message)]
    assert not ours, [str(w.message) for w in ours]
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if line.startswith("epoch ") and " batch " not in line]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert "ETA" in lines[0] and "ETA" in lines[1] and lines[2].endswith("done") and "loss" in lines[0]
    assert [line.split()[1] for line in out if " batch 2/2 " in line] == ["1/3", "2/3", "3/3"]  # TRAIN.PRINT_FREQ 2


def test_reporter_eta_and_tensorboard_scalars(monkeypatch):
    from fastprompt.training import console

    written = []

    class Writer:
        def __init__(self, log_dir):
            written.append(("dir", log_dir))

        def add_scalar(self, tag, value, step):
            written.append((tag, step))

        def flush(self):
            pass

        def close(self):
            written.append(("closed",))

    monkeypatch.setattr(console, "require_tensorboard", lambda: Writer)
    rep = EpochReporter(4, 0, show=False, tensorboard="tb/run")
    line = rep.epoch_done({"epoch": 1, "loss": 1.5, "train_acc": 50.0, "lr": [1e-5], "seconds": 10.0, "img_per_s": 3.0})
    assert line.endswith("ETA 30s")  # 3 epochs left at 10 s each
    assert rep.epoch_done({"epoch": 2, "loss": 1.0, "lr": [2e-3], "seconds": 30.0}).endswith("ETA 40s")  # mean 20 s
    rep.close()
    assert written[0] == ("dir", "tb/run") and ("train/loss", 2) in written and ("train/accuracy", 1) in written
    assert written[-1] == ("closed",)


def test_tensorboard_missing_is_one_clear_error(tmp_path, capsys, monkeypatch):
    from fastprompt.cli import main
    from fastprompt.training import console

    def missing():
        raise ImportError("--tensorboard needs the tensorboard package: pip install 'fastprompt[tensorboard]'")

    monkeypatch.setattr(console, "require_tensorboard", missing)
    assert main(["train", "--dataset", "caltech101", "--root", str(tmp_path), "--tensorboard", str(tmp_path / "tb")]) == 2
    assert "pip install 'fastprompt[tensorboard]'" in capsys.readouterr().err


def test_run_config_paths_are_absolute(tmp_path, monkeypatch, capsys):
    from fastprompt.cli import main
    from fastprompt.datasets import make_synthetic_dataset
    from tests.training.test_cli_train import TINY

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    make_synthetic_dataset(str(tmp_path / "data"), "caltech101", num_classes=2, images_per_class=4)
    argv = ["base2new", "--dataset", "caltech101", "--seeds", "1", "--model", "tiny.json", "--pretrained", "none",
            "--root", "data", "--device", "cpu", "--num-workers", "0", "--no-progress", "--epochs", "1", "--shots", "1",
            "--output-dir", "b2n", "--opts", "TRAINER.COOP.N_CTX", "2"]
    assert main(argv) == 0
    assert "base2new run 1/1: coop on caltech101, seed 1" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "b2n" / "caltech101" / "seed1" / "run_config.json").read_text())
    assert cfg["root"] == str(tmp_path / "data") and cfg["model"] == str(tmp_path / "tiny.json")
    assert cfg["output_dir"] == str(tmp_path / "b2n" / "caltech101" / "seed1")
    monkeypatch.chdir(tmp_path / "data")  # evaluate the run from elsewhere: its config resolves
    assert main(["eval", "--run", cfg["output_dir"], "--dataset", "caltech101", "--device", "cpu", "--num-workers", "0",
                 "--no-progress"]) == 0
