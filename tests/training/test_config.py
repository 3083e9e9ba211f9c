"""Method defaults, yacs-style --opts, YAML/JSON config files, and the base-to-new arithmetic."""
from __future__ import annotations

import json

import pytest
import torch

from fastprompt.training import (TrainConfig, apply_mapping, apply_opts, evaluate, harmonic_mean, load_config_file,
                                 resolve_defaults, summarize_base2new, summarize_cross_dataset)


def test_official_defaults():
    d = resolve_defaults(TrainConfig(method="coop", shots=16))
    assert (d.epochs, d.batch_size, d.lr, d.momentum, d.weight_decay, d.warmup_epoch, d.warmup_lr) == (
        200, 32, 0.002, 0.9, 5e-4, 1, 1e-5)
    assert resolve_defaults(TrainConfig(method="coop", shots=1)).epochs == 50
    assert resolve_defaults(TrainConfig(method="coop", shots=4)).epochs == 100
    assert resolve_defaults(TrainConfig(method="coop", shots=16, dataset="imagenet")).epochs == 50
    c = resolve_defaults(TrainConfig(method="cocoop"))
    assert (c.epochs, c.batch_size, c.lr) == (10, 1, 0.002)
    assert resolve_defaults(TrainConfig(method="coop", epochs=3)).epochs == 3  # explicit values win


def test_opts_map_to_run_and_learner_config():
    cfg = apply_opts(TrainConfig(method="coop"), [
        "OPTIM.LR", "0.0035", "OPTIM.MAX_EPOCH", "10", "DATALOADER.TRAIN_X.BATCH_SIZE", "4", "TRAINER.COOP.N_CTX", "4",
        "TRAINER.COOP.CSC", "True", "TRAINER.COOP.CTX_INIT", "a photo of a", "TRAINER.COOP.PREC", "amp",
        "MODEL.BACKBONE.NAME", "ViT-B/16", "DATASET.NUM_SHOTS", "8", "OPTIM.NAME", "sgd"])
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.shots, cfg.precision, cfg.model) == (0.0035, 10, 4, 8, "amp", "ViT-B-16")
    assert cfg.learner == {"n_ctx": 4, "csc": True, "ctx_init": "a photo of a"}
    cfg.validate()
    # TRAINER.NAME switches the method before TRAINER.<METHOD>.* keys resolve
    assert apply_opts(TrainConfig(), ["TRAINER.COCOOP.N_CTX", "2", "TRAINER.NAME", "CoCoOp"]).learner == {"n_ctx": 2}


@pytest.mark.parametrize("opts, match", [
    (["TRAINER.COOP.NOPE", "1"], "valid keys: .*TRAINER.COOP.N_CTX"),
    (["OPTIM.LR"], "KEY VALUE pairs"),
    (["OPTIM.MAX_EPOCH", "2.5"], "expects an integer"),
    (["TRAINER.COOP.CSC", "3"], "expects true/false"),
    (["OPTIM.NAME", "adam"], "not supported"),
    (["TRAINER.COOP.PREC", "int8"], "must be one of"),
])
def test_bad_opts(opts, match):
    with pytest.raises((ValueError, TypeError), match=match):
        apply_opts(TrainConfig(method="coop"), opts)


def test_config_files(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("TRAINER:\n  NAME: cocoop\n  COCOOP:\n    N_CTX: 2\nOPTIM:\n  LR: 0.01\nshots: 4\n")
    cfg = apply_mapping(TrainConfig(), load_config_file(str(y)))
    assert (cfg.method, cfg.learner, cfg.lr, cfg.shots) == ("cocoop", {"n_ctx": 2}, 0.01, 4)
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"method": "coop", "learner": {"n_ctx": 3}, "epochs": 5}))
    cfg = apply_mapping(TrainConfig(), load_config_file(str(j)))
    assert (cfg.learner, cfg.epochs) == ({"n_ctx": 3}, 5)
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        load_config_file(str(bad))
    with pytest.raises(FileNotFoundError):
        load_config_file(str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match="unknown method"):
        TrainConfig(method="nosuch").validate()


def test_base2new_average_is_hm_of_averages():
    # as the papers compute it: CoCoOp's average B 80.47 and N 71.69 give H 75.83 (not the mean of per-dataset H)
    assert harmonic_mean(80.47, 71.69) == pytest.approx(75.83, abs=5e-3)
    runs = [{"dataset": "a", "seed": 1, "base": 90.0, "new": 60.0}, {"dataset": "a", "seed": 2, "base": 80.0, "new": 70.0},
            {"dataset": "b", "seed": 1, "base": 50.0, "new": 10.0}]
    rows = {r["dataset"]: r for r in summarize_base2new(runs)}
    assert (rows["a"]["base"], rows["a"]["new"]) == (85.0, 65.0)
    assert rows["a"]["hm"] == pytest.approx(2 * 85 * 65 / 150)
    assert rows["Average"]["hm"] == pytest.approx(harmonic_mean(67.5, 37.5))
    assert rows["Average"]["hm"] != pytest.approx((rows["a"]["hm"] + rows["b"]["hm"]) / 2)
    xd = summarize_cross_dataset([{"dataset": "imagenet", "accuracy": 70.0}, {"dataset": "x", "accuracy": 50.0},
                                  {"dataset": "y", "accuracy": 40.0}], source="imagenet")
    assert xd[-1] == {"dataset": "Average", "accuracy": 45.0, "seeds": 0}


def test_evaluate_counts_and_caches_text(monkeypatch):
    from tests.training.helpers import NoisyTensorDataset, make_coop

    learner = make_coop(n_ctx=2)
    data = NoisyTensorDataset(7, 5, noise=0.0)
    calls = []
    original = learner._text_features
    monkeypatch.setattr(learner, "_text_features", lambda: calls.append(1) or original())
    res = evaluate(learner, data, batch_size=3)
    with torch.no_grad():
        pred = learner(data.images).argmax(-1)
    assert res["correct"] == int((pred == data.labels).sum()) and res["total"] == 7
    per_class = [float((pred[data.labels == c] == c).double().mean()) for c in range(5)]
    assert res["macro_accuracy"] == pytest.approx(100 * sum(per_class) / 5)
    assert len(calls) == 1  # one text encoding for 3 test batches (+1 above is cached too)


@pytest.mark.parametrize("method, expected", [
    # (epochs, batch, lr, weight decay, warm-up epochs, schedule, lr x batch/256)
    ("ivlp", (5, 4, 0.0035, 5e-4, 1, "cosine", False)),
    ("prograd", (10, 4, 0.0035, 5e-4, 1, "cosine", False)),
    ("decapt", (10, 4, 0.0035, 5e-4, 1, "cosine", False)),
    ("vpt", (100, 128, 5.0, 1e-4, 10, "warmup_cosine", True)),
    ("vapt", (100, 64, 5.0, 1e-4, 10, "warmup_cosine", True)),
])
def test_method_defaults_of_the_remaining_methods(method, expected):
    d = resolve_defaults(TrainConfig(method=method, shots=16))
    assert (d.epochs, d.batch_size, d.lr, d.weight_decay, d.warmup_epoch, d.lr_scheduler, d.lr_batch_scaling) == expected
    assert resolve_defaults(d) == d  # idempotent


def test_dapt_defaults_follow_the_protocol_and_dataset():
    # few-shot (DAPT's scripts): epochs by shots as CoOp, batch 32, per-dataset lr and betas
    d = resolve_defaults(TrainConfig(method="dapt", dataset="dtd", shots=16))
    assert (d.epochs, d.batch_size, d.lr, d.learner) == (200, 32, 20.0, {"vis_beta": 100.0, "txt_beta": 0.01})
    assert resolve_defaults(TrainConfig(method="dapt", dataset="OxfordPets", shots=4)).lr == 0.02  # Dassl names too
    assert resolve_defaults(TrainConfig(method="dapt", dataset="imagenet", shots=16)).epochs == 50
    assert resolve_defaults(TrainConfig(method="dapt", dataset="my_folder", shots=1)).lr == 0.002  # outside the table
    # a run's own learner options win over the per-dataset ones
    own = resolve_defaults(TrainConfig(method="dapt", dataset="dtd", learner={"vis_beta": 1.0}))
    assert own.learner == {"vis_beta": 1.0, "txt_beta": 0.01}
    # base-to-new: CaPT's DAPT baseline (10 epochs, batch 4, lr 0.0035, the learner's default betas)
    b = resolve_defaults(TrainConfig(method="dapt", dataset="dtd", subsample="base"))
    assert (b.epochs, b.batch_size, b.lr, b.learner) == (10, 4, 0.0035, {})


def test_vpt_keys_and_schedule_options():
    cfg = apply_opts(TrainConfig(method="vpt"), [
        "SOLVER.BASE_LR", "0.25", "SOLVER.TOTAL_EPOCH", "30", "SOLVER.WARMUP_EPOCH", "5", "SOLVER.WEIGHT_DECAY", "0.01",
        "DATA.BATCH_SIZE", "64", "SOLVER.SCHEDULER", "warmup_cosine", "SOLVER.OPTIMIZER", "sgd"])
    assert (cfg.lr, cfg.epochs, cfg.warmup_epoch, cfg.weight_decay, cfg.batch_size, cfg.lr_scheduler) == (
        0.25, 30, 5, 0.01, 64, "warmup_cosine")
    # a Dassl method can be switched to VPT's schedule, and explicit settings beat the method's
    d = resolve_defaults(apply_opts(TrainConfig(method="coop"), ["OPTIM.LR_SCHEDULER", "warmup_cosine",
                                                                 "OPTIM.WARMUP_EPOCH", "0", "lr_batch_scaling", "True"]))
    assert (d.lr_scheduler, d.warmup_epoch, d.lr_batch_scaling, d.weight_decay) == ("warmup_cosine", 0, True, 5e-4)
    with pytest.raises(ValueError, match="lr_scheduler must be one of"):
        apply_opts(TrainConfig(method="coop"), ["OPTIM.LR_SCHEDULER", "step"]).validate()
    with pytest.raises(ValueError, match="not supported"):
        apply_opts(TrainConfig(method="vpt"), ["SOLVER.OPTIMIZER", "adamw"])


def test_promptkd_protocol_and_per_dataset_kd_weight():
    """PromptKD's base2new script: every image of all classes (NUM_SHOTS 0), KD_WEIGHT 200 on FGVCAircraft and
    Flowers102, 1000 elsewhere (the learner's default); the CoOp protocol for everything else."""
    from fastprompt.training.config import base2new_protocol, method_defaults

    assert base2new_protocol("promptkd") == {"train_subsample": "all", "shots": -1}
    assert base2new_protocol("coop") == {"train_subsample": "base", "shots": 16}
    assert method_defaults("promptkd", "FGVCAircraft")["learner"] == {"kd_weight": 200.0}
    assert method_defaults("promptkd", "oxford_flowers", "all")["learner"] == {"kd_weight": 200.0}
    assert method_defaults("promptkd", "caltech101")["learner"] == {}
    cfg = resolve_defaults(TrainConfig(method="promptkd", dataset="fgvc_aircraft", learner={"kd_weight": 5.0}))
    assert cfg.learner == {"kd_weight": 5.0}  # the user's value wins
