"""KgCoOp (Yao, Zhang, Xu, CVPR'23): CoOp with knowledge guidance towards the hand-crafted prompt.

The context is CoOp's (one shared context, class name at the end, M = 4 from "a photo of a"). The loss adds
``W * (1 - mean_c cos(t_c, w_c))``, where t_c is the learned prompt's class feature and w_c the frozen CLIP
feature of the dataset's hand-crafted template (KgCoOp's table: CoOp's, except DTD "a photo of a {}, a type of
texture."). The official code loads a second CLIP copy to compute w once; here it is one ``encode_text`` pass of
the same frozen model (``frozen_text_features``), redone by ``set_classnames``.

Deliberate differences from the official code:

* ``ctx_init`` is honoured; the official code replaces any non-empty CTX_INIT by "a photo of a" (the default
  here, so the default behaviour is the same).
* The template features are computed in the model's dtype on the model in use (the official copy is fp16).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastprompt.learners._common import context_init
from fastprompt.learners._family import UnifiedContext, rebuild_unified_prompts
from fastprompt.learners.base import LearnerConfig, PromptLearner
from fastprompt.learners.registry import register_learner
from fastprompt.losses import knowledge_guidance_score
from fastprompt.templates import KGCOOP_TEMPLATES, template_for


@dataclass
class KgCoOpConfig(LearnerConfig):
    """Official KgCoOp base-to-new defaults (``vit_b16_ep100_ctxv1`` + scripts: NCTX=4, W=8.0)."""

    n_ctx: int = 4
    ctx_init: str = "a photo of a"  # "" gives n_ctx random N(0, init_std^2) tokens
    w: float = 8.0  # weight of the knowledge-guidance term
    dataset: str = ""  # picks the template in KGCOOP_TEMPLATES ("" or unknown: "a photo of a {}.")
    template: Optional[str] = None  # overrides the dataset's template, e.g. "a photo of a {}, a type of pet."
    init_std: float = 0.02

    def validate(self) -> None:
        super().validate()
        if self.w < 0:
            raise ValueError(f"w must be >= 0, got {self.w}")
        if self.template is not None and "{}" not in self.template:
            raise ValueError(f"template {self.template!r} has no '{{}}' slot for the class name")


@register_learner("kgcoop")
class KgCoOp(UnifiedContext, PromptLearner):
    """KgCoOp learner. ``forward(images [B, 3, H, W]) -> logits [B, C]``; ``compute_loss`` adds the knowledge
    guidance. Trainable: ``ctx`` [M, D] only. Buffer ``template_features`` [C, E] (normalised, frozen)."""

    config_class = KgCoOpConfig
    training_defaults = {"epochs": 100, "batch_size": 128, "lr": 0.002}
    tiny_setup = {}

    @classmethod
    def bench_setup(cls, classnames, dataset="imagenet", tasks=2):
        return list(classnames), {"dataset": dataset}  # its hand-crafted template
    image_conditional = False
    image_features_frozen = True  # logits see images only through encode_images (feature store)

    def __init__(self, clip_model: nn.Module, classnames: Sequence[str], config=None, tokenizer=None, **kwargs):
        super().__init__(clip_model, classnames, config, tokenizer, **kwargs)
        config = self.config
        vectors, self.prompt_prefix, self.n_ctx = context_init(
            self.tower, self.tokenizer, config.ctx_init, config.n_ctx, False, 1, config.init_std
        )
        self.ctx = nn.Parameter(vectors)
        self.set_classnames(classnames)

    @property
    def template(self) -> str:
        return self.config.template or template_for(self.config.dataset or "", KGCOOP_TEMPLATES)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Rebuild the prompts and the hand-crafted template features for a new class list."""
        self.register_buffer("template_features", rebuild_unified_prompts(self, classnames, self.template), persistent=False)

    # ------------------------------------------------------------------ plug-in protocol (see _family.py)
    # image_features, class_text_features, logits, encode_text, forward, compute_loss: UnifiedContext.

    def knowledge_guidance(self, t: torch.Tensor) -> torch.Tensor:
        """[C, E] learned-prompt features -> [] ``1 - mean_c cos(t_c, w_c)`` (unweighted)."""
        return knowledge_guidance_score(F.normalize(t, dim=-1), self.template_features)

    def loss_from_features(self, v, t, labels, itm_loss=None, params=None):
        """``itm_loss(logits, y) + W * (1 - mean cos(t, w))`` (itm_loss defaults to cross-entropy)."""
        logits = self.logits_from_features(v, t)
        itm = (itm_loss or F.cross_entropy)(logits, labels)
        return itm + self.config.w * self.knowledge_guidance(t), logits
