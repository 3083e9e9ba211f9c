"""Bad inputs give one clear line naming the file or option; stale caches and mismatched backbones are caught."""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

import fastprompt
from fastprompt.cli import main
from tests.conftest import tiny_clip

NAMES = ["cat", "dog", "car"]


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


@pytest.mark.parametrize("options, named", [
    ({"n_ctx": -3}, "n_ctx must be >= 0"), ({"n_ctx": True}, "n_ctx must be an integer"),
    ({"n_ctx": 2.5}, "n_ctx must be an integer"), ({"n_ctx": 0}, "n_ctx must be >= 1"),
    ({"init_std": float("nan")}, "init_std must be finite"), ({"init_std": -1.0}, "init_std must be >= 0"),
    ({"ctx_init": "a  photo of a"}, "ctx_init 'a  photo of a' has empty words"),
    ({"csc": "yes"}, "csc must be true or false"),
])
def test_learner_options_are_checked(clip, options, named):
    with pytest.raises(ValueError, match=named):
        fastprompt.create_learner("coop", clip, NAMES, **options)


def test_duplicate_class_names_are_an_error_naming_them(clip):
    with pytest.raises(ValueError, match=r"'golden retriever' \(classes \[1, 2\]\)"):
        fastprompt.create_learner("coop", clip, ["cat", "golden_retriever", "Golden  Retriever"], n_ctx=2)
    with warnings.catch_warnings(record=True) as caught:  # ImageNet's official list repeats two names
        warnings.simplefilter("always")
        fastprompt.create_learner("coop", clip, ["missile", "dog", "missile"], n_ctx=2)
    assert any("official class list" in str(w.message) for w in caught)


def test_split_file_giving_one_label_two_names(tmp_path):
    from fastprompt.datasets import build_dataset, make_synthetic_dataset

    make_synthetic_dataset(str(tmp_path), "eurosat", num_classes=2, images_per_class=3)
    split = next(tmp_path.rglob("split_zhou_EuroSAT.json"))
    data = json.loads(split.read_text())
    data["test"][0][2] = "another name"
    split.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="label 0 has two class names"):
        build_dataset("eurosat", str(tmp_path))


def test_empty_batch_is_named(clip):
    learner = fastprompt.create_learner("coop", clip, NAMES, n_ctx=2)
    with pytest.raises(ValueError, match="empty batch"):
        learner(torch.zeros(0, 3, 32, 32, dtype=torch.float64))


def test_fastprompt_backend_variable(monkeypatch, clip):
    monkeypatch.setenv("FASTPROMPT_BACKEND", "torch")  # listed in the README: valid
    assert fastprompt.create_learner("coop", clip, NAMES, n_ctx=2).backend == "torch"
    monkeypatch.setenv("FASTPROMPT_BACKEND", "tpu")
    with pytest.raises(ValueError, match="FASTPROMPT_BACKEND='tpu' is not a backend"):
        fastprompt.create_learner("coop", clip, NAMES, n_ctx=2)


def test_eval_cache_follows_in_place_edits_through_data(clip):
    learner = fastprompt.create_learner("coop", clip, NAMES, n_ctx=2).eval()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        before = learner(images)
        learner.ctx.data += 1  # bumps no version counter
        after = learner(images)
    learner.clear_cache()
    with torch.no_grad():
        fresh = learner(images)
    assert not torch.equal(before, after) and torch.equal(after, fresh)


def test_adapter_on_another_backbone_is_refused(tmp_path, clip):
    learner = fastprompt.create_learner("coop", clip, NAMES, n_ctx=2)
    learner.save_pretrained(str(tmp_path))
    other = tiny_clip()
    with torch.no_grad():
        other.token_embedding.weight.mul_(1.5)
    with pytest.raises(ValueError, match="strict_backbone=False.*--allow-backbone-mismatch"):
        fastprompt.from_pretrained(str(tmp_path), clip_model=other)
    with pytest.warns(UserWarning, match="loading anyway"):
        fastprompt.from_pretrained(str(tmp_path), clip_model=other, strict_backbone=False)
    assert torch.equal(fastprompt.from_pretrained(str(tmp_path), clip_model=clip).ctx, learner.ctx)
    # An adapter written before backbones were recorded (config JSON only, weights without a header config).
    from safetensors.torch import save_file

    meta = json.loads((tmp_path / "fastprompt_config.json").read_text())
    for key in ("clip_backbone", "format_version"):
        meta.pop(key)
    (tmp_path / "fastprompt_config.json").write_text(json.dumps(meta))
    save_file({"ctx": learner.ctx.detach()}, str(tmp_path / "prompt_learner.safetensors"))
    with pytest.warns(UserWarning, match="records no backbone identity"):
        assert torch.equal(fastprompt.from_pretrained(str(tmp_path), clip_model=other).ctx, learner.ctx)


def test_bad_image_files_are_named(tmp_path):
    from PIL import Image

    from fastprompt.datasets import Datum
    from fastprompt.datasets.images import ImageDecodeError, check_images
    from fastprompt.training.data import DatumDataset

    good, empty, cut = tmp_path / "good.jpg", tmp_path / "empty.jpg", tmp_path / "cut.jpg"
    Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48).save(good)
    empty.write_bytes(b"")
    cut.write_bytes(good.read_bytes()[: os.path.getsize(good) // 2])  # header intact, pixel data truncated
    bad = dict(check_images([str(good), str(empty), str(cut)], decode=True))
    assert set(bad) == {str(empty), str(cut)} and "empty (0 bytes)" in bad[str(empty)]
    assert set(dict(check_images([str(good), str(empty), str(cut)], decode=False))) == {str(empty)}
    data = DatumDataset([Datum(str(cut), 0)], lambda im: im)
    with pytest.raises(ImageDecodeError, match=f"cannot read image {cut}"):
        data[0]


def test_cli_errors_are_one_line(tmp_path, capsys):
    bad_model = tmp_path / "bad.json"
    bad_model.write_text("{not json")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    good_model = tmp_path / "fp-inputs-tiny.json"
    good_model.write_text(json.dumps({"embed_dim": 16, "vision_cfg": {"layers": 1, "width": 16, "head_width": 16,
                                      "patch_size": 16, "image_size": 32},
                                      "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16,
                                                   "heads": 1, "layers": 1}}))
    from fastprompt.datasets import make_synthetic_dataset

    make_synthetic_dataset(str(tmp_path / "data"), "eurosat", num_classes=2, images_per_class=3)
    common = ["train", "--dataset", "eurosat", "--root", str(tmp_path / "data"), "--device", "cpu", "--shots", "1",
              "--num-workers", "0", "--no-progress"]
    cases = [
        (common + ["--model", str(bad_model), "--output-dir", str(tmp_path / "o1")], f"model config {bad_model} is not valid JSON"),
        (common + ["--model", str(good_model), "--pretrained", str(garbage), "--output-dir", str(tmp_path / "o2")],
         f"--pretrained {garbage} is not a checkpoint"),
        (["bench", "--classes", "0"], "--classes must be >= 1"), (["bench", "--repeats", "0"], "--repeats must be >= 1"),
        (["bench", "--json", str(tmp_path / "missing" / "x.json")], "does not exist"),
    ]
    for argv, named in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and named in err, err
    # The malformed --model file did not poison open_clip's registry for later builds in this process.
    from fastprompt.training.runner import build_clip

    build_clip(str(good_model), None, torch.device("cpu"))


def test_ctrl_c_prints_the_resume_command(monkeypatch, tmp_path, capsys):
    import fastprompt.training.runner as runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "train_run", interrupted)
    argv = ["train", "--dataset", "eurosat", "--root", str(tmp_path), "--output-dir", str(tmp_path / "run"),
            "--opts", "OPTIM.LR", "0.1"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "fastprompt train --resume --dataset eurosat" in err and "OPTIM.LR 0.1" in err and "Traceback" not in err


def test_datasets_command_names_corrupt_images(tmp_path, capsys):
    from fastprompt.datasets import build_dataset, make_synthetic_dataset

    make_synthetic_dataset(str(tmp_path), "eurosat", num_classes=2, images_per_class=3)
    victim = build_dataset("eurosat", str(tmp_path)).test[0].impath
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 3)
    assert main(["datasets", "--root", str(tmp_path), "--dataset", "eurosat", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "eurosat: BAD IMAGES" in out and victim in out
