"""The frozen open_clip backbone: loading, freezing, and a uniform view of the text tower.

open_clip has two layouts. ``CLIP`` keeps the text tower's parts as attributes of the model itself;
``CustomTextCLIP`` keeps them under ``model.text`` (a ``TextTransformer`` or an HF model). ``TextTower``
hides the difference. Parts are looked up on every access, so ``model.to(...)`` / ``.double()`` are seen.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import open_clip
import torch
import torch.nn as nn

__all__ = ["load_clip", "TextTower", "freeze", "check_clip_model", "clip_source", "eval_preprocess"]


def check_clip_model(model) -> None:
    """Raise a clear TypeError unless ``model`` is an open_clip CLIP / CustomTextCLIP with a text tower."""
    kinds = tuple(k for k in (getattr(open_clip, "CLIP", None), getattr(open_clip, "CustomTextCLIP", None)) if k)
    if not isinstance(model, kinds):
        raise TypeError(
            "clip_model must be an open_clip model (open_clip.CLIP or open_clip.CustomTextCLIP), got "
            f"{type(model).__module__}.{type(model).__name__}; build one with fastprompt.load_clip(name) or "
            "open_clip.create_model(name)"
        )
    if not hasattr(model, "visual") or not hasattr(model, "logit_scale"):
        raise TypeError(f"{type(model).__name__} lacks a vision tower or logit_scale")


class TextTower:
    """A view over the text tower of an open_clip model, whichever layout it has."""

    def __init__(self, model: nn.Module):
        check_clip_model(model)
        self.model = model

    @property
    def _root(self) -> nn.Module:
        text = getattr(self.model, "text", None)
        return text if isinstance(text, nn.Module) else self.model

    @property
    def is_hf(self) -> bool:
        return not hasattr(self._root, "token_embedding")

    @property
    def token_embedding(self) -> nn.Embedding:
        return self._root.token_embedding

    @property
    def positional_embedding(self) -> torch.Tensor:
        return self._root.positional_embedding

    @property
    def transformer(self) -> nn.Module:
        return self._root.transformer

    @property
    def ln_final(self) -> nn.Module:
        return self._root.ln_final

    @property
    def text_projection(self):
        return self._root.text_projection

    @property
    def attn_mask(self) -> Optional[torch.Tensor]:
        return getattr(self._root, "attn_mask", None)

    @property
    def pool_type(self) -> str:
        root = self._root
        return getattr(root, "text_pool_type", None) or getattr(root, "pool_type", "argmax")

    @property
    def eos_id(self) -> Optional[int]:
        root = self._root
        for attr in ("text_eos_id", "eos_id"):
            if getattr(root, attr, None) is not None:
                return int(getattr(root, attr))
        return None

    @property
    def context_length(self) -> int:
        return int(self.positional_embedding.shape[0])

    @property
    def width(self) -> int:
        return int(self.token_embedding.weight.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    @property
    def blocks(self):
        return self.transformer.resblocks

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """[N, width] -> [N, embed_dim] through ``text_projection`` (a Parameter, an nn.Linear or None)."""
        proj = self.text_projection
        if proj is None:
            return x
        if isinstance(proj, nn.Module):
            return proj(x)
        return x @ proj

    def unsupported_reason(self) -> Optional[str]:
        """Why the fast prompted engine cannot run this tower (None when it can).

        Truncation and prefix sharing are exact only for a causal tower that pools one token (the EOT).
        """
        if self.is_hf:
            return "the text tower is a Hugging Face model, not an open_clip TextTransformer"
        root = self._root
        if getattr(root, "cls_emb", None) is not None:
            return "the text tower appends a CLS token after the padding (CoCa-style)"
        if self.attn_mask is None:
            return "the text tower is not causal (no attn_mask), so positions after EOT matter"
        if self.pool_type not in ("argmax", "eos"):
            return f"the text tower pools with {self.pool_type!r}, not at the EOT token"
        if getattr(root, "use_pad_mask", False):
            return "the text tower masks padding tokens"
        for i, blk in enumerate(self.blocks):
            attn = getattr(blk, "attn", None)
            if not isinstance(attn, nn.MultiheadAttention):
                return f"block {i} uses {type(attn).__name__}, not nn.MultiheadAttention"
            if not attn._qkv_same_embed_dim or attn.in_proj_weight is None or attn.bias_k is not None:
                return f"block {i} has an unusual attention layout (separate q/k/v or bias_k)"
            if attn.add_zero_attn or hasattr(blk, "ln_1_kv"):
                return f"block {i} has zero-attention or cross-attention"
            for name in ("ln_1", "ln_2", "mlp"):
                if not hasattr(blk, name):
                    return f"block {i} has no {name}"
        return None


def freeze(model: nn.Module) -> nn.Module:
    """Freeze every CLIP weight, as the official CoOp-family code does."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def clip_source(model: nn.Module) -> Tuple[Optional[str], Optional[str]]:
    """(architecture name, pretrained tag or path) recorded by :func:`load_clip`, or (None, None)."""
    return getattr(model, "_fastprompt_source", (None, None))


def eval_preprocess(model: nn.Module):
    """The model's own test-time image preprocessing: open_clip's ``image_transform`` with the size, mean, std,
    interpolation and resize mode the model records (``model.visual.preprocess_cfg``; CLIP's defaults and
    ``visual.image_size`` for a model built without one). PIL image -> [3, H, W] float tensor."""
    cfg = dict(getattr(model.visual, "preprocess_cfg", None) or {})
    size = cfg.get("size", getattr(model.visual, "image_size", 224))
    return open_clip.image_transform(
        size, is_train=False, mean=cfg.get("mean"), std=cfg.get("std"), resize_mode=cfg.get("resize_mode"),
        interpolation=cfg.get("interpolation"), fill_color=cfg.get("fill_color", 0),
    )


def load_clip(
    name: str = "ViT-B-16",
    pretrained: Optional[str] = None,
    device: Optional[str | torch.device] = None,
    precision: str = "fp32",
    cache_dir: Optional[str] = None,
    **kwargs,
):
    """Build a frozen open_clip model.

    Args:
        name: an open_clip architecture (``open_clip.list_models()``), ``hf-hub:org/repo`` or ``local-dir:path``.
        pretrained: None for random weights (tests, benchmarks), an open_clip tag such as ``"openai"``, or a
            path to a checkpoint file on disk.
        device, precision, cache_dir, **kwargs: passed to ``open_clip.create_model_and_transforms``.

    Returns:
        (model, preprocess, tokenizer): the model in eval mode with every parameter frozen, the validation
        transform, and the matching tokenizer.
    """
    if pretrained is not None and not isinstance(pretrained, str):
        raise TypeError(f"pretrained must be None, a tag or a path, got {type(pretrained).__name__}")
    if pretrained is not None and os.path.sep in pretrained and not os.path.exists(pretrained):
        raise FileNotFoundError(f"pretrained checkpoint {pretrained!r} does not exist")
    known = set(open_clip.list_models())
    if not name.startswith(("hf-hub:", "local-dir:")) and name not in known:
        raise ValueError(f"unknown open_clip architecture {name!r}; see open_clip.list_models()")
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, device=device, precision=precision, cache_dir=cache_dir, **kwargs
    )
    tokenizer = open_clip.get_tokenizer(name)
    freeze(model).eval()
    model._fastprompt_source = (name, pretrained)
    return model, preprocess, tokenizer


RANDOM_INIT_SEED = 0


def load_clip_reproducible(name: str, pretrained: Optional[str] = None, **kwargs):
    """:func:`load_clip`, except that random weights (``pretrained=None``) are drawn under a fixed seed
    (``RANDOM_INIT_SEED``) without touching the global RNG: a run on a random backbone (tests, smoke runs) and
    its later evaluation then build the same CLIP, which the adapter's backbone fingerprint checks."""
    if pretrained is not None:
        return load_clip(name, pretrained=pretrained, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return load_clip(name, pretrained=None, **kwargs)
