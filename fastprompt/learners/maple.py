"""MaPLe (Khattak et al., CVPR'23): multi-modal prompt learning with coupled vision-language prompts.

Language prompts are learned; every vision prompt is a linear projection (text width -> vision width) of the
language prompt of the same depth, so the two branches stay coupled:

* depth 0: ``ctx`` [M, Dt] enters the text prompt ``[SOS] c_1..c_M <rest of ctx_init> <name>. [EOT]``;
  ``proj(ctx)`` [M, Dv] is appended after the image patches before ``ln_pre``.
* depth i = 1 .. depth-1: ``compound_prompts_text[i-1]`` replaces the text context positions before text
  block i; ``compound_prompt_projections[i-1](compound_prompts_text[i-1])`` replaces the last M image tokens
  before vision block i.

Official defaults (ViT-B/16 base-to-new): N_CTX=2 initialised from "a photo of a" (the learned tokens are
"a photo" and "of a" stays fixed text, the official quirk), PROMPT_DEPTH=9, SGD lr 0.0035, batch 4, 5 epochs.
Loss: cross-entropy only.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn

from fastprompt.learners._deep_prompts import (
    build_text_encoder, deep_text_features, official_context_init, prompted_image_features, DeepTextFeatures,
    visual_width,
)
from fastprompt.learners._family import CosineClassifier
from fastprompt.learners.base import LearnerConfig, PromptLearner
from fastprompt.learners.registry import register_learner


@dataclass
class MaPLeConfig(LearnerConfig):
    """``TRAINER.MAPLE.*`` of ``configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml``, lower-cased."""

    n_ctx: int = 2
    ctx_init: str = "a photo of a"  # used when n_ctx <= 4, as the official code does
    prompt_depth: int = 9  # 1 = shallow MaPLe; at most the number of layers
    init_std: float = 0.02


@register_learner("maple")
class MaPLe(DeepTextFeatures, CosineClassifier, PromptLearner):
    """MaPLe learner. ``forward(images [B, 3, H, W]) -> logits [B, C]``.

    Trainable: ``ctx`` [M, Dt], ``proj`` Linear(Dt, Dv), ``compound_prompts_text`` (depth-1) x [M, Dt],
    ``compound_prompt_projections`` (depth-1) x Linear(Dt, Dv). ViT-B/16 at the defaults: 3,555,072 values.
    Plug-in hooks: ``image_features(images) -> [B, E]`` and ``text_features(class_idx=None) -> [C or K, E]`` (both
    unnormalised).
    """

    method = "maple"
    config_class = MaPLeConfig
    training_defaults = {"epochs": 5, "batch_size": 4, "lr": 0.0035}
    tiny_setup = {"prompt_depth": 2}
    image_conditional = False  # plug-in protocol (fastprompt/learners/_family.py)

    def __init__(self, clip_model: nn.Module, classnames: Sequence[str], config=None, tokenizer=None, **kwargs):
        super().__init__(clip_model, classnames, config, tokenizer, **kwargs)
        config = self.config
        depth = config.prompt_depth
        n_layers = min(len(self.tower.blocks), len(self.clip.visual.transformer.resblocks))
        if not 1 <= depth <= n_layers:
            raise ValueError(f"prompt_depth must be in 1..{n_layers}, got {depth}")
        vectors, self.prompt_prefix = official_context_init(
            self.tower, self.tokenizer, config.ctx_init, config.n_ctx, config.init_std
        )
        self.n_ctx = config.n_ctx
        dt, dv = vectors.shape[1], visual_width(self.clip)
        kw = {"dtype": vectors.dtype, "device": vectors.device}
        self.ctx = nn.Parameter(vectors)
        self.proj = nn.Linear(dt, dv).to(**kw)
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(nn.init.normal_(torch.empty(self.n_ctx, dt, **kw), std=config.init_std)) for _ in range(depth - 1)]
        )
        # The official code builds ONE Linear and deep-copies it, so every deep projection starts identical.
        single = nn.Linear(dt, dv).to(**kw)
        self.compound_prompt_projections = nn.ModuleList([copy.deepcopy(single) for _ in range(depth - 1)])
        self.set_classnames(classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Rebuild the class-dependent text buffers for a new class list (base -> new)."""
        self.classnames, self.text = build_text_encoder(self, classnames, self.n_ctx, self.prompt_prefix)
        self._text_cache = None

    # ------------------------------------------------------------------ prompts
    def text_deep_prompts(self) -> Dict[int, torch.Tensor]:
        """{text block i: [M, Dt]} for i = 1 .. depth-1 (the official counter: block i gets prompt i-1)."""
        return {i + 1: p for i, p in enumerate(self.compound_prompts_text)}

    def vision_prompts(self) -> Dict[int, torch.Tensor]:
        """{vision block i: [M, Dv]}: 0 -> proj(ctx) appended; i >= 1 -> projected compound prompt i-1."""
        prompts = {0: self.proj(self.ctx)}
        for i, (p, layer) in enumerate(zip(self.compound_prompts_text, self.compound_prompt_projections)):
            prompts[i + 1] = layer(p)
        return prompts

    # ------------------------------------------------------------------ plug-in hooks
    # text_features: DeepTextFeatures; logits, loss, encode_text, forward: CosineClassifier.

    def class_text_features(
        self, image_features=None, class_shift: Optional[torch.Tensor] = None, class_idx: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """-> [C, E] unnormalised class text features (plug-in hook, ``fastprompt/learners/_family.py``).
        ``image_features`` is unused (not image-conditional); ``class_shift`` [C, Dt] (CaPT) is added to the
        input context of class c; ``class_idx`` [K] int64 restricts the result to those classes ([K, E]; the
        fast engine encodes only them, the reference encodes all C at 77 tokens and indexes)."""
        return deep_text_features(self, self.text, self.ctx, self.text_deep_prompts(), class_shift, class_idx)


    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, E] unnormalised prompted image features."""
        return prompted_image_features(self, images, self.vision_prompts())

