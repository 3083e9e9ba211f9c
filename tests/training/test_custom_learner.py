"""A learner defined in this file only (no other file touched) registers itself, takes its training defaults
from its own class, validates its config through ``LearnerConfig`` and trains one epoch through the CLI
(``fastprompt train``) on a synthetic dataset, then comes back through ``fastprompt.from_pretrained``."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastprompt
from fastprompt.classplan import clean_classnames
from fastprompt.cli import main
from fastprompt.learners import register_learner
from fastprompt.learners.base import LearnerConfig, PromptLearner
from fastprompt.learners.registry import unregister_learner
from fastprompt.templates import format_prompts
from tests.training.test_cli_train import TINY, _common

NAME = "toy_shift"


@dataclass
class ToyShiftConfig(LearnerConfig):
    n_ctx: int = 2  # learned image-feature shifts, averaged
    init_std: float = 0.02
    template: str = "a photo of a {}."


class ToyShift(PromptLearner):
    """Logits = logit_scale * cos(frozen image features + mean of ``ctx`` [n_ctx, E], frozen template text)."""

    config_class = ToyShiftConfig
    training_defaults = {"epochs": 1, "batch_size": 2, "lr": 0.05}
    tiny_setup = {"n_ctx": 2}

    def __init__(self, clip_model, classnames, config=None, tokenizer=None, **kwargs):
        super().__init__(clip_model, classnames, config, tokenizer, **kwargs)
        E = int(self.clip.visual.output_dim)
        dtype = self.clip.logit_scale.dtype
        self.ctx = nn.Parameter(torch.randn(self.config.n_ctx, E, dtype=dtype) * self.config.init_std)
        self.set_classnames(classnames)

    def set_classnames(self, classnames) -> None:
        self.classnames = clean_classnames(classnames)
        feats = self.frozen_text_features(format_prompts(self.config.template, self.classnames))
        self.register_buffer("text", F.normalize(feats, dim=-1).to(self.ctx.device), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        v = F.normalize(self.encode_images(images) + self.ctx.mean(0), dim=-1)
        return self.logit_scale * v.to(self.text.dtype) @ self.text.t()


@pytest.fixture
def toy_registered():
    register_learner(NAME)(ToyShift)
    try:
        yield ToyShift
    finally:
        unregister_learner(NAME)


def test_config_validation_in_one_place(toy_registered):
    assert ToyShiftConfig.build({"n_ctx": 3}).n_ctx == 3
    for bad in ({"n_ctx": True}, {"n_ctx": 0}, {"n_ctx": 1.5}, {"init_std": math.nan}, {"init_std": -0.1},
                {"template": 3}, {"backend": "fastest"}):
        with pytest.raises((TypeError, ValueError), match=next(iter(bad))):
            ToyShiftConfig.build(bad)
    with pytest.raises(TypeError, match="no option"):
        ToyShiftConfig.build({"n_ctxx": 3})


def test_trains_one_epoch_through_the_cli(toy_registered, tmp_path):
    from fastprompt.datasets import make_synthetic_dataset

    model = tmp_path / "fp-toy-tiny.json"
    model.write_text(json.dumps(TINY))
    root = tmp_path / "data"
    make_synthetic_dataset(str(root), "caltech101", num_classes=4, images_per_class=6)
    run = tmp_path / "run"
    argv = ["train", "--method", NAME, "--dataset", "caltech101", "--output-dir", str(run)]
    argv += _common(str(model), str(root))
    assert main(argv) == 0
    cfg = json.loads((run / "run_config.json").read_text())
    # the optimisation settings come from the class's own training_defaults
    assert (cfg["epochs"], cfg["batch_size"], cfg["lr"]) == (1, 2, 0.05)
    results = json.loads((run / "results.json").read_text())
    assert results["finished"] and results["test"]["num_classes"] == 4
    assert len((run / "log.jsonl").read_text().splitlines()) == 2  # start + 1 epoch
    learner = fastprompt.from_pretrained(str(run / "adapter"))
    assert isinstance(learner, ToyShift) and learner.config == ToyShiftConfig()
    assert learner.ctx.shape == (2, TINY["embed_dim"]) and torch.isfinite(learner.ctx).all()
