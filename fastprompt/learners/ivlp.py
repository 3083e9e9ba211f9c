"""IVLP: independent vision-language deep prompting (the baseline of the MaPLe paper, and PromptSRC's prompts).

Unlike MaPLe, the two branches are not coupled: the text side learns ``ctx`` (word-initialised) plus one
[Mt, Dt] tensor per text block 1 .. depth_text-1 replacing the context positions, and the vision side learns
``vpt`` [Mv, Dv] appended after the patch tokens before ``ln_pre`` plus one [Mv, Dv] tensor per vision block
1 .. depth_vision-1 overwriting those tokens (the official ``ResidualAttentionBlock_IVLP``).

Official defaults (``configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml``, the base-to-new script):
2 text + 2 vision tokens, "a photo of a" (so "of a" stays fixed text, as in MaPLe), depth 12 on both sides,
SGD lr 0.0035, batch 4, 5 epochs. Loss: cross-entropy only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastprompt.learners._common import PromptLearner, config_from
from fastprompt.learners._family import itm_logits
from fastprompt.learners._deep_prompts import (
    IndependentPrompts, build_text_encoder, cosine_logits, deep_text_features, prompted_image_features,
)
from fastprompt.learners.registry import register_learner


@dataclass
class IVLPConfig:
    """``TRAINER.IVLP.*``, lower-cased (official base-to-new defaults)."""

    n_ctx_text: int = 2
    n_ctx_vision: int = 2
    ctx_init: str = "a photo of a"  # used when n_ctx_text <= 4
    prompt_depth_text: int = 12  # >= 1
    prompt_depth_vision: int = 12  # 0 = no vision prompts
    init_std: float = 0.02
    backend: Optional[str] = None


@register_learner("ivlp")
class IVLP(PromptLearner):
    """IVLP learner. ``forward(images [B, 3, H, W]) -> logits [B, C]``.

    Trainable (under ``prompts``): ``ctx`` [Mt, Dt], ``text_deep`` (depth_text-1) x [Mt, Dt], ``vpt``
    [Mv, Dv], ``vpt_deep`` (depth_vision-1) x [Mv, Dv]. Hooks: ``image_features(images) -> [B, E]``,
    ``text_features() -> [C, E]`` (unnormalised).
    """

    method = "ivlp"
    config_class = IVLPConfig
    image_conditional = False  # plug-in protocol (fastprompt/learners/_family.py)

    def __init__(self, clip_model: nn.Module, classnames: Sequence[str], config=None, tokenizer=None, **kwargs):
        config = config_from(IVLPConfig, config, kwargs)
        super().__init__(clip_model, classnames, config, tokenizer)
        self.prompts = IndependentPrompts(
            self, config.n_ctx_text, config.n_ctx_vision, config.ctx_init, config.prompt_depth_text,
            config.prompt_depth_vision, config.init_std,
        )
        self.set_classnames(classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Rebuild the class-dependent text buffers for a new class list (base -> new)."""
        p = self.prompts
        self.classnames, self.text = build_text_encoder(self, classnames, p.n_ctx_text, p.prompt_prefix)
        self._text_cache = None

    def text_features(self) -> torch.Tensor:
        """[C, E] unnormalised prompted class text features."""
        return self.class_text_features()

    def class_text_features(self, image_features=None, class_shift: Optional[torch.Tensor] = None) -> torch.Tensor:
        """-> [C, E] unnormalised class text features (plug-in hook, ``fastprompt/learners/_family.py``).
        ``image_features`` is unused (not image-conditional); ``class_shift`` [C, Dt] (CaPT) is added to the
        input context of class c."""
        return deep_text_features(self, self.text, self.prompts.ctx, self.prompts.text_deep_prompts(), class_shift)

    def logits_from_features(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v [B, E], t [C, E] (unnormalised) -> [B, C] = logit_scale * cos."""
        return itm_logits(self.logit_scale, v, t)

    def loss_from_features(self, v, t, labels, itm_loss=None, params=None):
        """The objective from features: ``itm_loss(logits, labels)`` (cross-entropy by default)."""
        logits = self.logits_from_features(v, t)
        return (itm_loss or F.cross_entropy)(logits, labels), logits

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, E] unnormalised prompted image features."""
        return prompted_image_features(self, images, self.prompts.vision_prompts())

    def encode_text(self) -> torch.Tensor:
        """[C, E] L2-normalised text features (cached in eval mode under no_grad)."""
        return self.cached_text_features(lambda: F.normalize(self.text_features(), dim=-1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> logits [B, C]."""
        return cosine_logits(self, self.image_features(images), self.encode_text())
