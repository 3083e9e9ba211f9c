"""What the fault sweep (``fault_sweep.py``) found unclear or silent, one test each: the message names the
option or file, or a warning names the skipped file."""
from __future__ import annotations

import json
import pytest

import fastprompt
from fastprompt.cli import main
from tests.conftest import tiny_clip


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


def test_no_clip_model_names_the_argument():
    with pytest.raises(TypeError, match="clip_model must be an open_clip model.*got builtins.NoneType"):
        fastprompt.create_learner("coop", None, ["cat", "dog"])


def test_from_pretrained_on_a_training_run_points_at_its_adapter(tmp_path, clip):
    run = tmp_path / "run"
    fastprompt.create_learner("coop", clip, ["cat", "dog"], n_ctx=2).save_pretrained(str(run / "adapter"))
    with pytest.raises(FileNotFoundError, match=f"{run} is a training run, not an adapter folder; load {run}/adapter"):
        fastprompt.from_pretrained(str(run), clip_model=clip)


def test_missing_relative_path_is_not_a_hub_traceback(monkeypatch, clip):
    import fastprompt.hub as hub

    def offline(*args, **kwargs):
        raise OSError("Got: ConnectError: [Errno -2] Name or service not known")

    monkeypatch.setattr(hub, "download", offline)  # what an offline (or missing) repository gives
    with pytest.raises(FileNotFoundError, match="'no_such_run/adapter' is not a local folder.*check the path"):
        fastprompt.from_pretrained("no_such_run/adapter", clip_model=clip)


def test_output_dir_that_is_a_file(tmp_path, capsys):
    occupied = tmp_path / "occupied"
    occupied.write_text("x")
    for out in (occupied, occupied / "sub"):  # the file itself, or a folder below it
        argv = ["train", "--dataset", "caltech101", "--root", str(tmp_path), "--device", "cpu",
                "--output-dir", str(out)]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: {out} cannot be a run directory: {occupied} is a file (--output-dir)", err
    assert occupied.read_text() == "x"


@pytest.mark.parametrize("command", ["train", "base2new"])
def test_zero_shots_names_the_option(tmp_path, capsys, command):
    argv = [command, "--dataset", "caltech101", "--root", str(tmp_path), "--device", "cpu", "--shots", "0",
            "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --shots / DATASET.NUM_SHOTS must be -1 (all images) or >= 1, got 0"


def test_summarize_warns_about_a_damaged_results_file(tmp_path):
    from fastprompt.training.summarize import summarize

    good, bad = tmp_path / "good", tmp_path / "bad"
    for run, text in ((good, json.dumps({"method": "coop", "dataset": "eurosat", "seed": 1, "accuracy": 50.0})),
                      (bad, '{"accuracy": 5')):
        run.mkdir()
        (run / "results.json").write_text(text)
    with pytest.warns(UserWarning, match=f"{bad / 'results.json'} is damaged.*left out"):
        out = summarize([str(tmp_path)], with_plot=False)
    assert [r["n"] for r in out["rows"]] == [1]


def test_base2new_passes_its_feature_store_on(tmp_path, monkeypatch):
    """The merged base2new lost its ``feature_store`` on the way to the per-seed runs (a NameError)."""
    import fastprompt.training.runner as runner

    seen = []

    def fake_train_run(cfg, resume=False, feature_store=None):
        seen.append(feature_store)
        raise KeyboardInterrupt  # stop right there: only the hand-over is checked

    monkeypatch.setattr(runner, "train_run", fake_train_run)
    store = object()
    cfg = runner.TrainConfig(method="coop", dataset="caltech101", root=str(tmp_path), device="cpu",
                             output_dir=str(tmp_path / "b2n"))
    with pytest.raises(KeyboardInterrupt):
        runner.base2new_run(cfg, ["caltech101"], [1], feature_store=store)
    assert seen == [store]


def test_truncated_split_file_is_named(tmp_path, capsys):
    from fastprompt.datasets import build_dataset, make_synthetic_dataset

    make_synthetic_dataset(str(tmp_path), "eurosat", num_classes=2, images_per_class=3)
    split = next(tmp_path.rglob("split_zhou_EuroSAT.json"))
    split.write_text(split.read_text()[:50])
    with pytest.raises(ValueError, match=f"{split} is not valid JSON"):
        build_dataset("eurosat", str(tmp_path))
    assert main(["datasets", "--root", str(tmp_path), "--dataset", "eurosat", "--no-progress"]) == 1
    assert f"{split} is not valid JSON" in capsys.readouterr().out


def test_config_root_under_the_home_folder(tmp_path, monkeypatch):
    """``DATASET.ROOT: ~/data`` in a config file (no shell expands it) is the home folder's data/."""
    from fastprompt.cli import _train_config, build_parser

    monkeypatch.setenv("HOME", str(tmp_path))
    config = tmp_path / "config.yaml"
    config.write_text("DATASET:\n  ROOT: ~/data\nOUTPUT_DIR: ~/out\n")
    cfg = _train_config(build_parser().parse_args(["train", "--dataset", "eurosat", "--config", str(config)]))
    assert (cfg.root, cfg.output_dir) == (str(tmp_path / "data"), str(tmp_path / "out"))


@pytest.mark.parametrize("content, problem", [
    (b"\xef\xbb\xbfcat\r\ndog\r\n", None),  # byte-order mark and CRLF line ends: the names are cat, dog
    (bytes(range(128, 256)), "is not UTF-8 text"),
    (b"\n \n", "lists no class names"),
], ids=["bom-crlf", "binary", "empty"])
def test_classnames_file(tmp_path, content, problem):
    import argparse

    from fastprompt.cli_ecosystem import _classnames

    path = tmp_path / "names.txt"
    path.write_bytes(content)
    args = argparse.Namespace(classnames_file=str(path), dataset=None, subsample="all")
    if problem is None:
        assert _classnames(args) == ["cat", "dog"]
    else:
        with pytest.raises(ValueError, match=f"--classnames-file {path} {problem}"):
            _classnames(args)
