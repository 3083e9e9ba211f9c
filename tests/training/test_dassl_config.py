"""Official YAML files as they are (``--config-file``, ``--dataset-config-file``): honoured keys, one warning
listing the ignored ones, PREC fp16. The files are written here in the shape of the official configs."""
from __future__ import annotations

import json
import warnings

import pytest

from fastprompt.training.config import TrainConfig
from fastprompt.training.dassl_config import apply_official_files

COOP_YAML = """DATALOADER:
  TRAIN_X:
    BATCH_SIZE: 32
  TEST:
    BATCH_SIZE: 100
  NUM_WORKERS: 8

INPUT:
  SIZE: (224, 224)
  INTERPOLATION: "bicubic"
  PIXEL_MEAN: [0.48145466, 0.4578275, 0.40821073]
  PIXEL_STD: [0.26862954, 0.26130258, 0.27577711]
  TRANSFORMS: ["random_resized_crop", "random_flip", "normalize"]

OPTIM:
  NAME: "sgd"
  LR: 0.002
  MAX_EPOCH: 50
  LR_SCHEDULER: "cosine"
  WARMUP_EPOCH: 1
  WARMUP_TYPE: "constant"
  WARMUP_CONS_LR: 1e-5

TRAIN:
  PRINT_FREQ: 5

TEST:
  EVALUATOR: "Classification"

MODEL:
  BACKBONE:
    NAME: "ViT-B/16"
"""

MAPLE_YAML = """DATALOADER:
  TRAIN_X:
    BATCH_SIZE: 4
OPTIM:
  NAME: "sgd"
  LR: 0.0035
  MAX_EPOCH: 5
TRAINER:
  MAPLE:
    N_CTX: 2
    CTX_INIT: "a photo of a"
    PREC: "fp16"
    PROMPT_DEPTH: 9
"""

DATASET_YAML = """DATASET:
  NAME: "Caltech101"
"""


def test_official_trainer_and_dataset_files(tmp_path):
    trainer, dataset = tmp_path / "vit_b16_ep50.yaml", tmp_path / "caltech101.yaml"
    trainer.write_text(COOP_YAML)
    dataset.write_text(DATASET_YAML)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = apply_official_files(TrainConfig(method="coop"), str(dataset), str(trainer))
    assert (cfg.dataset, cfg.batch_size, cfg.test_batch_size, cfg.num_workers) == ("caltech101", 32, 100, 8)
    assert (cfg.lr, cfg.epochs, cfg.warmup_epoch, cfg.warmup_lr, cfg.model) == (0.002, 50, 1, 1e-5, "ViT-B-16")
    assert cfg.print_freq == 5
    assert len(caught) == 1  # ONE warning, listing every ignored key
    message = str(caught[0].message)
    assert "TEST.EVALUATOR" in message and "PRINT_FREQ" not in message and "INPUT" not in message


def test_trainer_section_and_prec_fp16(tmp_path):
    path = tmp_path / "vit_b16_c2_ep5_batch4_2ctx.yaml"
    path.write_text(MAPLE_YAML)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = apply_official_files(TrainConfig(method="maple"), None, str(path))
    assert cfg.learner == {"n_ctx": 2, "ctx_init": "a photo of a", "prompt_depth": 9}
    assert cfg.precision == "fp16" and (cfg.batch_size, cfg.lr, cfg.epochs) == (4, 0.0035, 5)
    assert len(caught) == 1 and "whole model in fp16" in str(caught[0].message) and "autocast" in str(caught[0].message)


def test_differing_transforms_are_reported(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text('INPUT:\n  TRANSFORMS: ["random_crop", "normalize"]\n')
    with pytest.warns(UserWarning, match="INPUT.TRANSFORMS"):
        apply_official_files(TrainConfig(method="coop"), None, str(path))


def test_train_with_official_files(tmp_path):
    from fastprompt.cli import main
    from fastprompt.datasets import make_synthetic_dataset
    from tests.training.test_cli_train import TINY, _common

    model = tmp_path / "tiny.json"
    model.write_text(json.dumps(TINY))
    root = tmp_path / "data"
    make_synthetic_dataset(str(root), "caltech101", num_classes=3, images_per_class=4)
    trainer, dataset = tmp_path / "coop.yaml", tmp_path / "caltech101.yaml"
    trainer.write_text(COOP_YAML.replace("MAX_EPOCH: 50", "MAX_EPOCH: 1").replace("BATCH_SIZE: 32", "BATCH_SIZE: 2")
                       .replace("NUM_WORKERS: 8", "NUM_WORKERS: 0"))
    dataset.write_text(DATASET_YAML)
    run = tmp_path / "run"
    argv = ["train", "--config-file", str(trainer), "--dataset-config-file", str(dataset), "--output-dir", str(run),
            "--opts", "TRAINER.COOP.N_CTX", "2"]
    with pytest.warns(UserWarning, match="TEST.EVALUATOR"):
        assert main(argv[:-3] + _common(str(model), str(root), shots=1) + argv[-3:]) == 0
    cfg = json.loads((run / "run_config.json").read_text())
    assert (cfg["dataset"], cfg["epochs"], cfg["batch_size"], cfg["learner"]) == ("caltech101", 1, 2, {"n_ctx": 2})
