"""``fastprompt.benchmarking.step``: the reference-vs-fast training step behind ``fastprompt bench --step`` works for
every CLIP learner it offers, and its two paths agree (loss and every gradient) before anything is timed."""
from __future__ import annotations

import json

import pytest
import torch

from fastprompt.benchmarking.step import STEP_METHODS, TrainStep, run_step_case, step_learner
from fastprompt.cli import main
from tests.conftest import tiny_clip

NAMES = ["dog", "cat", "red car", "tree", "small boat", "house"]


@pytest.fixture(scope="module")
def tiny12():
    """12 vision and 12 text layers, so every method's default prompt depth (MaPLe 9, IVLP 12) fits."""
    import open_clip

    return tiny_clip(dtype=torch.float32, vision_layers=12, text_layers=12), open_clip.get_tokenizer("ViT-B-16")


@pytest.mark.parametrize("method", STEP_METHODS)
def test_step_case_every_method(method, tiny12):
    model, tokenizer = tiny12
    result = run_step_case(method, model, tokenizer, NAMES, batch=3, device="cpu", repeats=1, warmup=0)
    assert result.method == method and (result.classes, result.batch) == (6, 3)
    assert result.max_rel_err < 1e-5
    assert result.reference_ms > 0 and result.fast_ms > 0 and result.speedup == pytest.approx(
        result.reference_ms / result.fast_ms)


def test_train_step_restores_state(tiny12):
    """compare() leaves the trainable tensors and the optimizer as they were, and a step does change them."""
    model, tokenizer = tiny12
    learner = step_learner("coop", model, tokenizer, NAMES, torch.device("cpu"))
    images = torch.randn(2, 3, 32, 32)
    step = TrainStep(learner, images, torch.tensor([0, 4]))
    before = [p.detach().clone() for p in step.params]

    def set_backend(b):
        learner.backend = b

    assert step.compare(set_backend) < 1e-5
    assert all(torch.equal(a, p) for a, p in zip(before, step.params)) and not step.opt.state
    step()
    assert not all(torch.equal(a, p) for a, p in zip(before, step.params))


def test_bad_step_inputs(tiny12):
    model, tokenizer = tiny12
    with pytest.raises(ValueError, match="no training-step setup"):
        step_learner("vpt_classifier", model, tokenizer, NAMES, torch.device("cpu"))
    with pytest.raises(ValueError, match="precision"):
        run_step_case("coop", model, tokenizer, NAMES, batch=2, precision="fp64")
    with pytest.raises(ValueError, match="one class per task"):
        step_learner("softcpt", model, tokenizer, NAMES[:1], torch.device("cpu"), tasks=2)


def test_cli_step(tmp_path, capsys):
    out = tmp_path / "steps.json"
    assert main(["bench", "--step", "--method", "coop", "--classes", "3", "--batch", "2", "--device", "cpu",
                 "--json", str(out)]) == 0
    assert "| coop" in capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert rows[0]["method"] == "coop" and rows[0]["max_rel_err"] < 1e-5


def test_cli_text_bench_refuses_other_methods(capsys):
    assert main(["bench", "--method", "maple", "--device", "cpu"]) == 2
    assert "--step" in capsys.readouterr().err
    assert main(["bench", "--step", "--preset", "issue", "--device", "cpu"]) == 2
    assert main(["bench", "--step", "--dtype", "fp64", "--device", "cpu"]) == 2
