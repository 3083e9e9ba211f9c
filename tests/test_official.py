"""Official checkpoints in and out (``fastprompt.official``).

The official-format state dicts here are written by hand from each learner's attributes, following the official
trainers' module names (not through ``fastprompt.official.names``), so the tables are checked against an
independent statement of the format. Frozen entries the official files carry (token prefix/suffix, CLIP weights)
are included and must be dropped.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

import fastprompt
from fastprompt.official import export_official, load_official, read_official
from tests.conftest import images_for, tiny_clip
from tests.learner_setups import SETUPS, learner_classnames

NAMES = ["cat", "dog", "car", "tree"]
DEPTH = {"maple": {"prompt_depth": 3}, "ivlp": {"prompt_depth_text": 3, "prompt_depth_vision": 3},
         "promptsrc": {"n_ctx_text": 2, "n_ctx_vision": 2, "prompt_depth_text": 3, "prompt_depth_vision": 3}}


@functools.lru_cache(maxsize=1)
def _tok():
    """One tokenizer for every learner here (building one reads the BPE vocabulary: ~0.7 s)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=77)


@pytest.fixture(scope="module")
def clip():
    return tiny_clip(dtype=torch.float64, vision_layers=3)  # depth 3: two deep blocks on each side


def _options(method):
    opts = dict(SETUPS[method][0])
    opts.update(DEPTH.get(method, {}))
    if method == "capt":
        opts["base_config"] = {"n_ctx": 2}
    opts["backend"] = "reference"  # what is checked is which tensors load; the 77-token path is the quickest on CPU
    return opts


def _learner(method, clip, seed, perturb=True):
    torch.manual_seed(seed)
    learner = fastprompt.create_learner(method, clip, learner_classnames(method, NAMES), config=_options(method), tokenizer=_tok())
    if perturb:  # move every learned tensor off its initial value, so a load that silently skips one fails
        with torch.no_grad():
            for p in learner.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
    return learner.eval()


def _frozen(clip, d):
    """Entries the official state dicts carry besides the learned tensors."""
    return {"prompt_learner.token_prefix": torch.zeros(4, 1, d), "prompt_learner.token_suffix": torch.zeros(4, 70, d),
            "image_encoder.conv1.weight": torch.zeros(8, 3, 2, 2, dtype=torch.float16), "logit_scale": torch.zeros(())}


def official_dict(learner):
    """The learner's tensors under the official whole-model names (written from the official module layout)."""
    m = learner.method
    if m in ("coop", "kgcoop", "prograd"):
        return {"prompt_learner.ctx": learner.ctx}
    if m == "cocoop":
        out = {"prompt_learner.ctx": learner.ctx}
        for lin in ("linear1", "linear2"):
            layer = getattr(learner.meta_net, lin)
            out[f"prompt_learner.meta_net.{lin}.weight"] = layer.weight
            out[f"prompt_learner.meta_net.{lin}.bias"] = layer.bias
        return out
    if m == "maple":
        out = {"prompt_learner.ctx": learner.ctx, "prompt_learner.proj.weight": learner.proj.weight,
               "prompt_learner.proj.bias": learner.proj.bias}
        for i, p in enumerate(learner.compound_prompts_text):
            out[f"prompt_learner.compound_prompts_text.{i}"] = p
        for i, layer in enumerate(learner.compound_prompt_projections):
            out[f"prompt_learner.compound_prompt_projections.{i}.weight"] = layer.weight
            out[f"prompt_learner.compound_prompt_projections.{i}.bias"] = layer.bias
        return out
    if m in ("ivlp", "promptsrc"):
        p = learner.prompts
        out = {"prompt_learner.ctx": p.ctx, "image_encoder.VPT": p.vpt}
        for block in range(1, 3):  # block 0 is ctx / VPT; blocks 1.. hold VPT_shallow
            out[f"text_encoder.transformer.resblocks.{block}.VPT_shallow"] = p.text_deep[block - 1]
            out[f"image_encoder.transformer.resblocks.{block}.VPT_shallow"] = p.vpt_deep[block - 1]
        return out
    if m == "dept":
        out = official_dict(learner.base)
        out.update({"film_lp_text.scale": learner.film_text.scale, "film_lp_text.bias": learner.film_text.bias,
                    "film_lp_img.scale": learner.film_img.scale, "film_lp_img.bias": learner.film_img.bias,
                    "linear_probe_proj.weight": learner.head.weight, "linear_probe_proj.bias": learner.head.bias})
        return out
    if m == "capt":  # CaPT's own Linear stores W as [in, out]: y = x W + b
        t = learner.transfer
        pre = "learnable_params.prompt_learner."
        return {pre + "ctx": learner.base.ctx,
                pre + "ucp.unified_transfer.down.weight": t.down.weight.t(), pre + "ucp.unified_transfer.down.bias": t.down.bias,
                pre + "ucp.unified_transfer.up.weight": t.up.weight.t(), pre + "ucp.unified_transfer.up.bias": t.up.bias}
    if m == "softcpt":
        return {"task_prompt_learner.ctx": learner.task_ctx, "prompt_gen.proj": learner.proj}
    raise AssertionError(m)


def _logits(learner, images):
    with torch.no_grad():
        return learner(images)


METHODS = ["coop", "cocoop", "kgcoop", "prograd", "maple", "ivlp", "promptsrc", "dept", "capt", "softcpt"]


@pytest.mark.parametrize("method", METHODS)
def test_official_file_loads_to_same_logits(method, clip, tmp_path):
    original = _learner(method, clip, seed=0)
    state = {k: v.detach().clone() for k, v in official_dict(original).items()}
    state.update(_frozen(clip, clip.token_embedding.weight.shape[1]))
    path = tmp_path / "model.pth.tar-7"
    torch.save({"state_dict": state, "epoch": 7, "optimizer": {"state": {}}, "scheduler": None}, path)
    loaded = load_official(method, str(path), clip_model=clip, classnames=learner_classnames(method, NAMES),
                           verbose=False, tokenizer=_tok(), **_options(method)).eval()
    images = images_for(clip, 3, torch.float64)
    torch.testing.assert_close(_logits(loaded, images), _logits(original, images), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["coop", "cocoop"])
def test_keys_relative_to_prompt_learner(method, clip):
    """CoOp / CoCoOp register the prompt learner alone: a plain state dict with ``ctx``, ``meta_net.*``."""
    original = _learner(method, clip, seed=0)
    state = {k[len("prompt_learner."):]: v.detach().clone() for k, v in official_dict(original).items()}
    state["token_prefix"] = torch.zeros(4, 1, 64)
    loaded = load_official(method, state, clip_model=clip, classnames=NAMES, verbose=False, tokenizer=_tok(), **_options(method)).eval()
    for name, value in original.trainable_state_dict().items():
        torch.testing.assert_close(loaded.trainable_state_dict()[name], value, rtol=0, atol=0)


def test_fp16_checkpoint_is_cast_to_learner_dtype(clip):
    original = _learner("coop", clip, seed=0)
    half = original.ctx.detach().half()
    loaded = load_official("coop", {"ctx": half}, clip_model=clip, classnames=NAMES, verbose=False, tokenizer=_tok(), **_options("coop"))
    assert loaded.ctx.dtype == torch.float64
    torch.testing.assert_close(loaded.ctx.detach(), half.double(), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["maple", "capt", "softcpt", "coop", "dept"])
def test_export_then_load_round_trip(method, clip, tmp_path):
    original = _learner(method, clip, seed=0)
    files = export_official(original, tmp_path / "out", epoch=3)
    assert all(os.path.isfile(f) and f.endswith("model.pth.tar-3") for f in files)
    loaded = load_official(method, str(tmp_path / "out"), clip_model=clip, classnames=learner_classnames(method, NAMES),
                           verbose=False, tokenizer=_tok(), **_options(method)).eval()
    images = images_for(clip, 2, torch.float64)
    torch.testing.assert_close(_logits(loaded, images), _logits(original, images), rtol=0, atol=0)
    single = original.export_official(tmp_path / "one.pth.tar", layout="file")  # the learner method
    again = load_official(method, single[0], clip_model=clip, classnames=learner_classnames(method, NAMES),
                          verbose=False, tokenizer=_tok(), **_options(method)).eval()
    torch.testing.assert_close(_logits(again, images), _logits(original, images), rtol=0, atol=0)


def test_exported_coop_is_relative_to_prompt_learner(clip, tmp_path):
    """What Dassl writes for CoOp: ``prompt_learner/model.pth.tar-<N>`` with keys relative to the prompt learner."""
    original = _learner("coop", clip, seed=0)
    (path,) = export_official(original, tmp_path, epoch=2)
    assert path == os.path.join(str(tmp_path), "prompt_learner", "model.pth.tar-2")
    ck = torch.load(path, weights_only=True)
    assert ck["epoch"] == 2 and set(ck["state_dict"]) == {"ctx"}
    torch.testing.assert_close(ck["state_dict"]["ctx"], original.ctx.detach(), rtol=0, atol=0)


def test_dassl_dir_picks_highest_epoch_or_the_one_asked(clip, tmp_path, capsys):
    base = _learner("coop", clip, seed=0)
    folder = tmp_path / "prompt_learner"
    folder.mkdir()
    for epoch in (1, 10, 5):
        torch.save({"state_dict": {"ctx": base.ctx.detach() + epoch, "token_prefix": torch.zeros(1)}, "epoch": epoch},
                   folder / f"model.pth.tar-{epoch}")
    torch.save({"state_dict": {"ctx": base.ctx.detach() - 1}, "epoch": 4}, folder / "model-best.pth.tar")
    latest = load_official("coop", str(tmp_path), clip_model=clip, classnames=NAMES, tokenizer=_tok(), **_options("coop"))
    torch.testing.assert_close(latest.ctx.detach(), base.ctx.detach() + 10, rtol=0, atol=0)
    assert "model.pth.tar-10" in capsys.readouterr().out  # says which file it read
    fifth = load_official("coop", str(folder), clip_model=clip, classnames=NAMES, epoch=5, verbose=False, tokenizer=_tok(), **_options("coop"))
    torch.testing.assert_close(fifth.ctx.detach(), base.ctx.detach() + 5, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="model.pth.tar-6"):
        load_official("coop", str(tmp_path), clip_model=clip, classnames=NAMES, epoch=6, verbose=False, tokenizer=_tok(), **_options("coop"))
    best_only = tmp_path / "best" / "prompt_learner"
    best_only.mkdir(parents=True)
    os.replace(folder / "model-best.pth.tar", best_only / "model-best.pth.tar")
    assert read_official(str(tmp_path / "best")).files[0].endswith("model-best.pth.tar")


def test_unknown_missing_and_misshaped_keys_are_named(clip):
    original = _learner("cocoop", clip, seed=0)
    state = {k: v.detach() for k, v in official_dict(original).items()}
    with pytest.raises(ValueError, match="prompt_learner.extra_gate"):
        load_official("cocoop", {**state, "prompt_learner.extra_gate": torch.zeros(3)}, clip_model=clip,
                      classnames=NAMES, verbose=False, tokenizer=_tok(), **_options("cocoop"))
    partial = {k: v for k, v in state.items() if "linear2.bias" not in k}
    with pytest.raises(ValueError, match="lacks.*prompt_learner.meta_net.linear2.bias"):
        load_official("cocoop", partial, clip_model=clip, classnames=NAMES, verbose=False, tokenizer=_tok(), **_options("cocoop"))
    with pytest.raises(ValueError, match="prompt_learner.ctx.*shape"):
        load_official("coop", {"ctx": torch.zeros(5, 64)}, clip_model=clip, classnames=NAMES, verbose=False, tokenizer=_tok(), n_ctx=2)
    with pytest.raises(ValueError, match="classnames"):
        load_official("coop", {"ctx": torch.zeros(2, 64)}, clip_model=clip, verbose=False, tokenizer=_tok())
    with pytest.raises(ValueError, match="not a checkpoint"):
        load_official("coop", {"ctx": [1, 2]}, clip_model=clip, classnames=NAMES, verbose=False, tokenizer=_tok())


def test_convert_command_writes_an_adapter(tmp_path, capsys):
    """``fastprompt convert``: a Dassl output directory -> a fastprompt adapter holding the same tensors."""
    import json

    from safetensors.torch import load_file

    from fastprompt.cli import main
    from tests.training.test_cli_train import TINY

    model = tmp_path / "tiny.json"
    model.write_text(json.dumps(TINY))
    ctx = torch.randn(2, TINY["text_cfg"]["width"])
    folder = tmp_path / "official" / "prompt_learner"
    folder.mkdir(parents=True)
    torch.save({"state_dict": {"ctx": ctx.half(), "token_prefix": torch.zeros(1)}, "epoch": 3}, folder / "model.pth.tar-3")
    out = tmp_path / "adapter"
    argv = ["convert", "--method", "coop", "--checkpoint", str(tmp_path / "official"), "--output-dir", str(out),
            "--dataset", "caltech101", "--subsample", "base", "--model", str(model), "--pretrained", "none",
            "--option", "n_ctx=2"]
    assert main(argv) == 0
    assert "model.pth.tar-3" in capsys.readouterr().out
    meta = json.loads((out / "fastprompt_config.json").read_text())
    assert meta["method"] == "coop" and len(meta["classnames"]) == 50  # caltech101's 100 classes, base half
    torch.testing.assert_close(load_file(str(out / "prompt_learner.safetensors"))["ctx"], ctx.half().float(), rtol=0, atol=0)
    assert main(argv[:-2] + ["--option", "n_ctx=3"]) == 2  # shape mismatch: one clear line, exit 2
    assert "prompt_learner.ctx" in capsys.readouterr().err


def test_dpc_from_stage1_and_stage2_checkpoints(clip):
    """DPC: the stage-1 backbone from its own official checkpoint, the stage-2 (mixed) prompt from DPC's."""
    from fastprompt.learners.dpc import DPC

    backbone = _learner("coop", clip, seed=0)
    torch.manual_seed(1)
    original = DPC(clip, NAMES, tokenizer=_tok(), backbone_learner=backbone, top_k=2, seed=0).eval()
    with torch.no_grad():
        original.mixed["ctx"].add_(0.1 * torch.randn_like(original.mixed["ctx"]))
    stage1 = {"ctx": backbone.ctx.detach().clone(), "token_prefix": torch.zeros(1)}
    stage2 = {"state_dict": {"prompt_learner.ctx": original.mixed["ctx"].detach().clone()}, "epoch": 20}
    loaded = load_official("dpc", stage2, clip_model=clip, classnames=NAMES, backbone_checkpoint=stage1,
                           backbone_config=_options("coop"), top_k=2, seed=0, verbose=False, tokenizer=_tok()).eval()
    images = images_for(clip, 2, torch.float64)
    torch.testing.assert_close(_logits(loaded, images), _logits(original, images), rtol=0, atol=0)
    with pytest.raises(ValueError, match="backbone_checkpoint"):
        load_official("dpc", stage2, clip_model=clip, classnames=NAMES, verbose=False, tokenizer=_tok())
