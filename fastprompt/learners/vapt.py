"""VAPT (arXiv 2501.18936, "Visual Adaptive Prompt Tuning" / ICLR'26 "Revisit Visual Prompt Tuning"): deep
prompts generated from each layer's patch tokens.

Official code: ``Minhchuyentoancbn/VAPT`` (``src/models/vit_prompt/vit.py::PromptedTransformerAdaptive``,
``PromptDownSample``, ``ChannelWiseConv2d``, ``PromptMLP``). Block 0 gets VPT's static prompts ``[1, N, D]``
(after CLS, VPT init and prompt dropout); before every later block l >= ``vpt_depth`` the N prompt rows are
overwritten by

    p_l = t + W2 . dropout(relu(W1 . t)),   t = Linear_l(Dropout2d(conv_k_l(LayerNorm_l(patches_l))))

with ``LayerNorm_l`` over the layer's input tokens, one K x K kernel ``k_l`` shared by all channels (no bias),
a zero-initialised token projector ``Linear_l(H'W' -> N)`` (with bias) and one feature MLP ``W1 [8, D]``,
``W2 [D, 8]`` (bias-free) shared by all layers. Where the code and the poster differ we follow the code: the
residual ``t +`` and the token-projector bias (the poster writes ``g(x) = W2 s(W1 x)``); ``Dropout2d(0.1)`` on
the conv output is hard-coded there, so it is here (``conv_dropout``). Because ``Linear_l`` starts at zero, every
generated prompt is exactly zero at initialisation.

Differences from the official code, both deliberate: the patch grid comes from the tower (the official code
hard-codes 14 x 14 for patch 16, 16 x 16 for patch 14, i.e. 224 px input); the generator's own
``LayerNorm``/``Dropout2d``/``PromptMLP`` modules are replaced in the fast path by the fused ``vapt_prompts`` op,
with dropout masks drawn in the official order (see ``fastprompt.ops.vapt_prompts.reference.dropout_masks``).

:class:`VAPT` is the CLIP prompt learner (``create_learner("vapt", clip_model, classnames)``);
:class:`VAPTClassifier` the timm image classifier (``VAPTClassifier.from_timm(vit, num_classes)``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastprompt.encoders.prompted_vision import PromptedVisionEncoder
from fastprompt.learners.base import LearnerConfig, PromptLearner
from fastprompt.learners.registry import register_learner
from fastprompt.learners.vpt import (
    VPT_SOLVER, PromptedCLIP, VPTClassifier, _check_common, _patch_size, vpt_init_bound,
)
from fastprompt.ops.vapt_prompts import dropout_masks, vapt_prompts

__all__ = ["VAPT", "VAPTConfig", "VAPTGenerator", "VAPTClassifier"]


@dataclass
class VAPTConfig(LearnerConfig):
    """Options named after VAPT's ``MODEL.PROMPT.*`` keys, lower-cased (defaults of the official config; N and
    dropout from its README example)."""

    num_tokens: int = 10
    dropout: float = 0.1  # PROMPT.DROPOUT on the static input prompts
    dropout_mlp: float = 0.1  # DROPOUT_MLP, on the feature MLP's ReLU output
    conv_dropout: float = 0.1  # Dropout2d after the conv (hard-coded 0.1 in the official PromptDownSample)
    hidden_dim: int = 8  # HIDDEN_DIM of the shared feature projector
    kernel: int = 2  # KERNEL (PADDING=0, CHANNELWISE=True: one kernel shared by all channels)
    vpt_depth: int = 1  # VPT_DEPTH: blocks < vpt_depth get static VPT prompts, the rest adaptive ones
    insert: str = "after_cls"
    dataset: str = ""  # CLIP only: picks the class-text template
    template: Optional[str] = None  # CLIP only: overrides the template
    head_special_bias: bool = True  # classifier only (VPT's head init)

    def validate(self) -> None:
        super().validate()
        _check_config(self)


def _check_config(c: VAPTConfig) -> None:
    _check_common(c.num_tokens, c.dropout, c.insert)
    for name in ("dropout_mlp", "conv_dropout"):
        if not 0.0 <= getattr(c, name) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(c, name)!r}")
    if not isinstance(c.hidden_dim, int) or c.hidden_dim < 1:
        raise ValueError(f"hidden_dim must be a positive int, got {c.hidden_dim!r}")
    if not isinstance(c.kernel, int) or c.kernel < 1:
        raise ValueError(f"kernel must be a positive int, got {c.kernel!r}")


class _DownSample(nn.Module):
    """Holds one layer's conv kernel ``conv.kernel [1, 1, K, K]`` and token projector ``linear`` (official names)."""

    def __init__(self, K: int, n_in: int, N: int, dtype, device):
        super().__init__()
        self.conv = nn.Module()
        self.conv.kernel = nn.Parameter(torch.randn(1, 1, K, K, dtype=dtype, device=device))  # official: randn
        self.linear = nn.Linear(n_in, N, dtype=dtype, device=device)
        nn.init.zeros_(self.linear.weight)  # zero-init: every generated prompt starts at exactly 0
        nn.init.zeros_(self.linear.bias)


class VAPTGenerator(nn.Module):
    """VAPT's parameters; ``source(B, encoder=, fast=, backend=)`` returns the encoder's prompt callable."""

    def __init__(self, encoder: PromptedVisionEncoder, config: VAPTConfig):
        super().__init__()
        D, L = encoder.width, encoder.depth
        H, W = encoder.grid_size
        K, N = config.kernel, config.num_tokens
        if not 1 <= config.vpt_depth <= L:
            raise ValueError(f"vpt_depth must be in [1, {L}], got {config.vpt_depth}")
        if K > min(H, W):
            raise ValueError(f"kernel {K} is larger than the {H} x {W} patch grid")
        dtype, device = encoder.dtype, next(encoder.visual.parameters()).device
        self.config, self.grid, self.prefix = config, (H, W), encoder.num_prefix_tokens
        bound = vpt_init_bound(_patch_size(encoder), D)
        self.prompt_embeddings = nn.Parameter(torch.empty(1, N, D, dtype=dtype, device=device))
        nn.init.uniform_(self.prompt_embeddings, -bound, bound)
        if config.vpt_depth > 1:
            self.deep_prompt_embeddings = nn.Parameter(torch.empty(config.vpt_depth - 1, N, D, dtype=dtype, device=device))
            nn.init.uniform_(self.deep_prompt_embeddings, -bound, bound)
        n_adaptive = L - config.vpt_depth
        self.deep_prompt_norm = nn.ModuleList(nn.LayerNorm(D, dtype=dtype, device=device) for _ in range(n_adaptive))
        n_in = (H - K + 1) * (W - K + 1)
        self.deep_prompt_downsample = nn.ModuleList(_DownSample(K, n_in, N, dtype, device) for _ in range(n_adaptive))
        self.deep_prompt_embeddings_mlp = nn.Module()
        self.deep_prompt_embeddings_mlp.block = nn.Sequential(
            nn.Linear(D, config.hidden_dim, bias=False, dtype=dtype, device=device), nn.ReLU(),
            nn.Linear(config.hidden_dim, D, bias=False, dtype=dtype, device=device),
        )
        self.prompt_dropout = nn.Dropout(config.dropout)

    def _static(self, p: torch.Tensor, B: int) -> torch.Tensor:
        if self.training and self.prompt_dropout.p > 0:  # one mask per sample (expand, then dropout)
            return self.prompt_dropout(p.expand(B, -1, -1))
        return p[0]

    def _reference_layer(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """The official modules on tower tokens x [B, T, D]: LN over all tokens, drop the prefix, conv,
        Dropout2d, token projector, residual MLP with dropout on the ReLU output."""
        B, _, D = x.shape
        H, W = self.grid
        ds = self.deep_prompt_downsample[j]
        K = ds.conv.kernel.shape[-1]
        y = self.deep_prompt_norm[j](x)[:, self.prefix:].permute(0, 2, 1).reshape(B, D, H, W)
        z = F.conv2d(y, ds.conv.kernel.expand(D, 1, K, K), groups=D)
        z = F.dropout2d(z, self.config.conv_dropout, self.training).reshape(B, D, -1)
        t = ds.linear(z).permute(0, 2, 1)
        fc1, _, fc2 = self.deep_prompt_embeddings_mlp.block
        h = F.dropout(F.relu(fc1(t)), self.config.dropout_mlp, self.training)
        return fc2(h) + t

    def _fast_layer(self, j: int, x: torch.Tensor, backend: str) -> torch.Tensor:
        """The same layer through the fused ``vapt_prompts`` op (masks drawn in the official order)."""
        B, _, D = x.shape
        ln, ds = self.deep_prompt_norm[j], self.deep_prompt_downsample[j]
        fc1, _, fc2 = self.deep_prompt_embeddings_mlp.block
        cm = hm = None
        if self.training:
            cm, hm = dropout_masks(B, D, ds.linear.out_features, fc1.out_features, self.config.conv_dropout,
                                   self.config.dropout_mlp, x.dtype, x.device)
        return vapt_prompts(x[:, self.prefix:], ln.weight, ln.bias, ln.eps, ds.conv.kernel[0, 0], ds.linear.weight,
                            ds.linear.bias, fc1.weight, fc2.weight, self.grid, cm, hm, backend=backend, strict=False)

    def source(self, B: int, encoder=None, fast: bool = True, backend: str = "reference"):
        """The callable ``prompts(i, x [B, T, D]) -> [B | 1, N, D]`` the encoder calls before every block."""
        depth = self.config.vpt_depth

        def prompts(i: int, x: torch.Tensor):
            if i == 0:
                return self._static(self.prompt_embeddings, B)
            if i < depth:
                return self._static(self.deep_prompt_embeddings[i - 1 : i], B)
            j = i - depth
            return self._fast_layer(j, x, backend) if fast else self._reference_layer(j, x)

        return prompts


@register_learner("vapt")
class VAPT(PromptedCLIP, PromptLearner):
    """VAPT on an open_clip CLIP. ``forward(images [B, 3, H, W]) -> logits [B, C]`` against frozen class text
    features; trainable tensors: everything under ``prompts`` (see :class:`VAPTGenerator`)."""

    method = "vapt"
    config_class = VAPTConfig
    training_defaults = dict(VPT_SOLVER, batch_size=64)  # VAPT configs/base-prompt.yaml and README
    tiny_setup = {"num_tokens": 2}

    def __init__(self, clip_model: nn.Module, classnames: Sequence[str], config=None, tokenizer=None, **kwargs):
        super().__init__(clip_model, classnames, config, tokenizer, **kwargs)
        config = self.config
        self.encoder = PromptedVisionEncoder(self.clip.visual, config.insert)
        self.prompts = VAPTGenerator(self.encoder, config)
        self.set_classnames(classnames)


class VAPTClassifier(VPTClassifier):
    """VAPT on a frozen timm ViT with a trainable linear head (VTAB-1k / FGVC protocol); the classifier
    machinery is :class:`~fastprompt.learners.vpt.VPTClassifier`'s, the prompts a :class:`VAPTGenerator`."""

    method = "vapt"
    config_class = VAPTConfig

    @classmethod
    def from_timm(cls, model: nn.Module, num_classes: int, config=None, **kwargs) -> "VAPTClassifier":
        """VAPT on a timm ``VisionTransformer`` (e.g. ``vit_base_patch16_224``), with a new linear head."""
        config = VAPTConfig.build(config, kwargs)
        return cls(model, num_classes, lambda enc: VAPTGenerator(enc, config), config)
