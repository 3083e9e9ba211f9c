"""Shared fixtures: real open_clip architectures with random weights (no downloads in tests)."""
from __future__ import annotations

import logging
import os

# Triton kernels are decorated as interpreted or compiled at import time: without a GPU, run them in the CPU
# interpreter (tiny shapes only). This must happen before any fastprompt Triton module is imported.
if "TRITON_INTERPRET" not in os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that no pretrained weights were loaded


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b|| (with a floor for an all-zero reference)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def randomize_layernorms(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial LayerNorm affine parameters (weight ~ N(1, 0.1), bias ~ N(0, 0.1)), so a misplaced or
    missing LayerNorm would show in a comparison."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.1)
                m.bias.normal_(0.0, 0.1)
    return model


def tiny_clip(custom_text: bool = False, dtype=torch.float64, vision_layers: int = 2, text_layers: int = 3):
    """A real open_clip CLIP (or CustomTextCLIP) at toy width: causal text layers, a 32 px ViT."""
    import open_clip

    vision = open_clip.CLIPVisionCfg(layers=vision_layers, width=64, head_width=32, patch_size=16, image_size=32)
    text = open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=4, layers=text_layers)
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    torch.manual_seed(0)
    model = cls(embed_dim=48, vision_cfg=vision, text_cfg=text)
    return randomize_layernorms(model).to(dtype).eval()


def trainable(module: torch.nn.Module):
    """The tensors that require grad, in parameter order."""
    return [p for p in module.parameters() if p.requires_grad]


def images_for(model, batch: int, dtype):
    """Random normalised images [batch, 3, H, W] at the model's image size."""
    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    return torch.randn(batch, 3, *size, dtype=dtype)


@pytest.fixture(scope="session")
def vitb16_f64():
    import fastprompt

    torch.manual_seed(0)
    model, _, tokenizer = fastprompt.load_clip("ViT-B-16", pretrained=None)
    return model.double(), tokenizer


@pytest.fixture(params=[False, True], ids=["CLIP", "CustomTextCLIP"])
def tiny_model(request):
    return tiny_clip(custom_text=request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(autouse=True, scope="session")
def _feature_store_dir(tmp_path_factory):
    """CLI runs in tests keep their image-feature store in a temporary directory, not ~/.cache."""
    old = os.environ.get("FASTPROMPT_FEATURE_STORE")
    os.environ["FASTPROMPT_FEATURE_STORE"] = str(tmp_path_factory.mktemp("feature-store"))
    yield
    if old is None:
        os.environ.pop("FASTPROMPT_FEATURE_STORE", None)
    else:
        os.environ["FASTPROMPT_FEATURE_STORE"] = old
