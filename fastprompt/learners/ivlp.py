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
from typing import Sequence

import torch
import torch.nn as nn

from fastprompt.learners._deep_prompts import (
    IndependentPromptLearner, IndependentPrompts, prompted_image_features,
)
from fastprompt.learners._family import CosineClassifier
from fastprompt.learners.base import LearnerConfig, PromptLearner
from fastprompt.learners.registry import register_learner


@dataclass
class IVLPConfig(LearnerConfig):
    """``TRAINER.IVLP.*``, lower-cased (official base-to-new defaults)."""

    n_ctx_text: int = 2
    n_ctx_vision: int = 2
    ctx_init: str = "a photo of a"  # used when n_ctx_text <= 4
    prompt_depth_text: int = 12  # >= 1
    prompt_depth_vision: int = 12  # 0 = no vision prompts
    init_std: float = 0.02


@register_learner("ivlp")
class IVLP(IndependentPromptLearner, CosineClassifier, PromptLearner):
    """IVLP learner. ``forward(images [B, 3, H, W]) -> logits [B, C]``.

    Trainable (under ``prompts``): ``ctx`` [Mt, Dt], ``text_deep`` (depth_text-1) x [Mt, Dt], ``vpt``
    [Mv, Dv], ``vpt_deep`` (depth_vision-1) x [Mv, Dv]. Hooks: ``image_features(images) -> [B, E]``,
    ``text_features(class_idx=None) -> [C or K, E]`` (unnormalised).
    """

    method = "ivlp"
    config_class = IVLPConfig
    training_defaults = {"epochs": 5, "batch_size": 4, "lr": 0.0035}  # IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml
    tiny_setup = {"prompt_depth_text": 2, "prompt_depth_vision": 2}
    image_conditional = False  # plug-in protocol (fastprompt/learners/_family.py)

    def __init__(self, clip_model: nn.Module, classnames: Sequence[str], config=None, tokenizer=None, **kwargs):
        super().__init__(clip_model, classnames, config, tokenizer, **kwargs)
        config = self.config
        self.prompts = IndependentPrompts.from_config(self, config)
        self.set_classnames(classnames)

    # set_classnames, text_features, class_text_features: IndependentPromptLearner; logits, loss, encode_text,
    # forward: CosineClassifier.
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, E] unnormalised prompted image features."""
        return prompted_image_features(self, images, self.prompts.vision_prompts())

