"""``fastprompt.benchmarking.step``: the reference-vs-fast training step behind ``fastprompt bench --step`` works for
every CLIP learner it offers, and its two paths agree (loss and every gradient) before anything is timed."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from fastprompt.benchmarking.step import STEP_METHODS, TrainStep, run_step_case, step_learner
from fastprompt.cli import main
from tests.conftest import rel_err, tiny_clip

NAMES = ["dog", "cat", "red car", "tree", "small boat", "house"]


@pytest.fixture(scope="module")
def tiny12():
    """12 vision and 12 text layers, so every method's default prompt depth (MaPLe 9, IVLP 12) fits."""
    import open_clip

    return tiny_clip(dtype=torch.float32, vision_layers=12, text_layers=12), open_clip.get_tokenizer("ViT-B-16")


def _float32_errors(method, model, tokenizer):
    """(reference's error, fast path's error): the largest relative error of the float32 step's loss and
    gradients against the reference step in float64 (the ground truth) from the same trainable tensors."""
    cpu = torch.device("cpu")
    l32 = step_learner(method, model, tokenizer, NAMES, cpu)
    l64 = step_learner(method, copy.deepcopy(model).double(), tokenizer, NAMES, cpu).double()
    l64.load_trainable_state_dict({k: v.double() for k, v in l32.trainable_state_dict().items()})
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 32, 32, generator=gen)
    labels = torch.tensor([0, 3, 5])
    s32, s64 = TrainStep(l32, images, labels), TrainStep(l64, images.double(), labels)
    l64.backend = "reference"
    truth = s64(capture=True)
    errs = []
    for backend in ("reference", "auto"):
        l32.backend = backend
        loss, grads = s32(capture=True)
        s32.restore()
        assert len(grads) == len(truth[1]) > 0
        errs.append(max([rel_err(loss, truth[0])] + [rel_err(g, t) for g, t in zip(grads, truth[1])]))
    return tuple(errs)


@pytest.mark.parametrize("method", STEP_METHODS)
def test_step_case_every_method(method, tiny12):
    model, tokenizer = tiny12
    result = run_step_case(method, model, tokenizer, NAMES, batch=3, device="cpu", repeats=1, warmup=0)
    assert result.method == method and (result.classes, result.batch) == (6, 3)
    # Exact in float32 means: as close to the float64 truth as the float32 reference is (a small multiple of the
    # reference's own rounding error, plus a few float32 ulps for a tensor the reference gets almost exactly).
    ref_err, fast_err = _float32_errors(method, model, tokenizer)
    floor = 8 * torch.finfo(torch.float32).eps
    assert fast_err <= 4 * ref_err + floor, (fast_err, ref_err)
    assert result.max_rel_err <= 5 * ref_err + floor, (result.max_rel_err, ref_err)  # |fast - ref| by the triangle
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
