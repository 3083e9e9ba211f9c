"""``fastprompt train -> eval -> base2new`` end to end on synthetic datasets with a tiny open_clip config, and
the clear errors of bad input (nothing lost)."""
from __future__ import annotations

import json

import pytest

from fastprompt.cli import main

TINY = {"embed_dim": 32, "vision_cfg": {"layers": 1, "width": 32, "head_width": 16, "patch_size": 16, "image_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from fastprompt.datasets import make_synthetic_dataset

    base = tmp_path_factory.mktemp("cli")
    model = base / "fp-cli-tiny.json"
    model.write_text(json.dumps(TINY))
    root = base / "data"
    make_synthetic_dataset(str(root), "caltech101", num_classes=4, images_per_class=8)
    make_synthetic_dataset(str(root), "eurosat", num_classes=4, images_per_class=8, seed=1)
    return base, str(model), str(root)


def _common(model, root, shots=2):
    """The options every run here shares (``shots=None``: the command's default)."""
    return (["--model", model, "--pretrained", "none", "--root", root, "--device", "cpu", "--num-workers", "0",
             "--no-progress"] + ([] if shots is None else ["--shots", str(shots)]))


def test_train_eval_base2new(env, tmp_path):
    base, model, root = env
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("OPTIM:\n  MAX_EPOCH: 2\n  LR: 0.01\nDATALOADER:\n  TRAIN_X:\n    BATCH_SIZE: 2\n")
    run = tmp_path / "run"
    argv = ["train", "--method", "coop", "--dataset", "caltech101", "--subsample", "base", "--config", str(cfg_file),
            "--output-dir", str(run)] + _common(model, root) + ["--opts", "TRAINER.COOP.N_CTX", "2"]
    assert main(argv) == 0
    cfg = json.loads((run / "run_config.json").read_text())
    assert (cfg["epochs"], cfg["lr"], cfg["batch_size"], cfg["learner"]) == (2, 0.01, 2, {"n_ctx": 2})
    results = json.loads((run / "results.json").read_text())
    assert results["finished"] and results["test"]["num_classes"] == 2 and 0 <= results["accuracy"] <= 100
    assert (run / "adapter" / "prompt_learner.safetensors").is_file()
    assert len((run / "log.jsonl").read_text().splitlines()) == 3  # start + 2 epochs

    assert main(["eval", "--run", str(run), "--dataset", "caltech101", "eurosat", "--subsample", "new",
                 "--device", "cpu", "--num-workers", "0", "--no-progress"]) == 0
    ev = json.loads((run / "eval_new.json").read_text())
    assert [r["dataset"] for r in ev["rows"]] == ["caltech101", "eurosat", "Average"]
    assert ev["rows"][-1]["accuracy"] == pytest.approx(ev["rows"][1]["accuracy"])  # Avg excludes the source
    assert "| caltech101 |" in (run / "eval_new.md").read_text()

    out = tmp_path / "b2n"
    argv = ["base2new", "--method", "cocoop", "--dataset", "caltech101", "eurosat", "--seeds", "1", "2",
            "--epochs", "1", "--batch-size", "2", "--output-dir", str(out)] + _common(model, root)
    assert main(argv) == 0
    summary = json.loads((out / "base2new.json").read_text())
    assert len(summary["runs"]) == 4
    rows = {r["dataset"]: r for r in summary["rows"]}
    b = (rows["caltech101"]["base"] + rows["eurosat"]["base"]) / 2
    n = (rows["caltech101"]["new"] + rows["eurosat"]["new"]) / 2
    assert rows["Average"]["hm"] == pytest.approx(0 if b + n == 0 else 2 * b * n / (b + n))
    assert (out / "base2new.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| Average |" in (out / "base2new.md").read_text()
    assert (out / "base2new.csv").read_text().startswith("dataset,base,new,hm,seeds")
    assert (out / "eurosat" / "seed2" / "results_new.json").is_file()


def test_resume_via_cli(env, tmp_path):
    base, model, root = env
    run = tmp_path / "run"
    argv = ["train", "--dataset", "caltech101", "--epochs", "1", "--batch-size", "4", "--output-dir", str(run)] + _common(model, root)
    assert main(argv) == 0
    assert main(argv) == 2  # the finished run is not overwritten
    assert main(argv + ["--resume"]) == 0  # resuming a finished run re-evaluates it


def test_base2new_resume_reuses_finished_runs(env, tmp_path, monkeypatch):
    """An interrupted sweep resumed with --resume skips the seeds that finished (their stored results are
    used as they are) and trains only the rest; a finished seed with other settings is not reused."""
    import fastprompt.training.runner as runner

    base, model, root = env
    out = tmp_path / "b2n"
    argv = ["base2new", "--method", "coop", "--dataset", "caltech101", "--epochs", "1", "--batch-size", "2",
            "--output-dir", str(out)] + _common(model, root)
    assert main(argv + ["--seeds", "1"]) == 0
    first = json.loads((out / "base2new.json").read_text())["runs"][0]

    trained = []
    real_train_run = runner.train_run
    monkeypatch.setattr(runner, "train_run", lambda cfg, **kw: trained.append(cfg.seed) or real_train_run(cfg, **kw))
    assert main(argv + ["--seeds", "1", "2", "--resume"]) == 0
    assert trained == [2]  # seed 1 finished before: not trained or evaluated again
    runs = json.loads((out / "base2new.json").read_text())["runs"]
    assert [(r["seed"], r.get("reused", False)) for r in runs] == [(1, True), (2, False)]
    assert (runs[0]["base"], runs[0]["new"]) == (first["base"], first["new"])

    # Other settings in the same directory: not reused; the checkpoint then refuses with the difference.
    trained.clear()
    assert main(argv[:argv.index("--epochs") + 1] + ["2"] + argv[argv.index("--epochs") + 2:]
                + ["--seeds", "1", "--resume"]) == 2
    assert trained == [1]


def test_promptkd_two_stage_base2new(env, tmp_path):
    """Stage 1 trains a PromptSRC teacher; stage 2 distils it with PromptKD's base-to-new protocol: training on
    the unlabelled images of all classes (every image: shots -1), then testing on base and on new."""
    base, model, root = env
    teacher = tmp_path / "teacher"
    depth = ["--opts", "TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT", "1", "TRAINER.PROMPTSRC.PROMPT_DEPTH_VISION", "1"]
    assert main(["train", "--method", "promptsrc", "--dataset", "caltech101", "--epochs", "1", "--batch-size", "2",
                 "--output-dir", str(teacher)] + _common(model, root) + depth) == 0
    out = tmp_path / "kd"
    argv = ["base2new", "--method", "promptkd", "--dataset", "caltech101", "--seeds", "1", "--epochs", "1",
            "--batch-size", "2", "--output-dir", str(out)] + _common(model, root, shots=None)  # protocol default
    argv += ["--opts", "TRAINER.PROMPTKD.TEACHER_DIR", str(teacher / "adapter"), "TRAINER.PROMPTKD.PROMPT_DEPTH_VISION", "1"]
    assert main(argv) == 0
    run = out / "caltech101" / "seed1"
    cfg = json.loads((run / "run_config.json").read_text())
    assert (cfg["subsample"], cfg["shots"], cfg["method"]) == ("all", -1, "promptkd")
    start = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    from fastprompt.datasets import build_dataset

    assert start["train_images"] == len(build_dataset("caltech101", root, shots=-1, seed=1).train_x)
    base_res = json.loads((run / "results_base.json").read_text())
    new_res = json.loads((run / "results_new.json").read_text())
    assert (base_res["num_classes"], new_res["num_classes"]) == (2, 2)
    run_row = json.loads((out / "base2new.json").read_text())["runs"][0]
    assert (run_row["base"], run_row["new"]) == (base_res["accuracy"], new_res["accuracy"])


def test_bad_inputs_are_clear_errors(env, tmp_path, capsys):
    base, model, root = env
    out = tmp_path / "out"
    common = _common(model, root)

    def run(argv):
        code = main(argv)
        return code, capsys.readouterr().err

    code, err = run(["train", "--dataset", "oxford_pets", "--output-dir", str(out)] + common)
    assert code == 2 and "split_zhou_OxfordPets.json" in err
    code, err = run(["train", "--method", "nosuch", "--dataset", "caltech101", "--output-dir", str(out)] + common)
    assert code == 2 and "unknown method 'nosuch'" in err and "coop" in err
    code, err = run(["train", "--dataset", "caltech101", "--output-dir", str(out)] + common + ["--opts", "TRAINER.COOP.BOGUS", "1"])
    assert code == 2 and "TRAINER.COOP.N_CTX" in err  # lists the valid keys
    code, err = run(["train", "--dataset", "caltech101", "--output-dir", str(out)] + common + ["--opts", "OPTIM.LR", "fast"])
    assert code == 2 and "expects a number" in err
    code, err = run(["train", "--dataset", "caltech101", "--output-dir", str(out)] + [a if a != "2" else "50" for a in common])
    assert code == 2 and "--shots 50" in err
    assert not out.exists()  # none of the failures wrote anything

    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"garbage")
    code, err = run(["train", "--dataset", "caltech101", "--resume", "--epochs", "1", "--output-dir", str(out)] + common)
    assert code == 2 and "checkpoint.pt is corrupt" in err
    assert (out / "checkpoint.pt").read_bytes() == b"garbage" and sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]

    code, err = run(["eval", "--run", str(tmp_path / "nothing"), "--dataset", "caltech101"])
    assert code == 2 and "not a finished fastprompt training run" in err

    assert main(["datasets", "--root", root, "--dataset", "caltech101"]) == 0
    assert main(["datasets", "--root", root, "--dataset", "caltech101", "oxford_pets"]) == 1
    assert "oxford_pets: MISSING" in capsys.readouterr().out
