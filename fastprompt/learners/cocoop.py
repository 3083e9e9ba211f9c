"""CoCoOp (Zhou et al., CVPR'22): context conditioned on each image through a small meta-net.

Every image b shifts all M context tokens by pi_b = meta_net(normalised image feature b), so each image has its
own context and the text tower must encode B x C prompts. The official code loops over images and runs the
full 77-token tower per image; the fast path encodes all B x C pairs at once over B shared prefixes.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastprompt.classplan import build_class_plan, clean_classnames
from fastprompt.encoders.prompted_text import PromptedTextEncoder
from fastprompt.learners._common import context_init, plan_kwargs
from fastprompt.learners._family import itm_logits
from fastprompt.learners.base import LearnerConfig, PromptLearner
from fastprompt.learners.registry import register_learner
from fastprompt.ops.condition import condition


@dataclass
class CoCoOpConfig(LearnerConfig):
    """Official base-to-new config: 4 context tokens initialised from "a photo of a"."""

    n_ctx: int = 4
    ctx_init: str = "a photo of a"
    init_std: float = 0.02
    meta_net_reduction: int = 16  # hidden width = vis_dim // 16


@register_learner("cocoop")
class CoCoOp(PromptLearner):
    """CoCoOp learner. ``forward(images [B, 3, H, W]) -> logits [B, C]``. Trainable: ``ctx`` [M, D] and
    ``meta_net`` (Linear(E, E/16) -> ReLU -> Linear(E/16, D))."""

    method = "cocoop"
    config_class = CoCoOpConfig
    training_defaults = {"epochs": 10, "batch_size": 1, "lr": 0.002}
    tiny_setup = {"n_ctx": 2}
    image_conditional = True  # plug-in protocol (fastprompt/learners/_family.py): text features are [B, C, E]
    image_features_frozen = True  # logits see images only through encode_images (feature store)

    def __init__(self, clip_model: nn.Module, classnames: Sequence[str], config=None, tokenizer=None, **kwargs):
        super().__init__(clip_model, classnames, config, tokenizer, **kwargs)
        config = self.config
        vectors, self.prompt_prefix, self.n_ctx = context_init(
            self.tower, self.tokenizer, config.ctx_init, config.n_ctx, False, 1, config.init_std
        )
        self.ctx = nn.Parameter(vectors)
        vis_dim = int(self.clip.visual.output_dim)
        hidden = vis_dim // config.meta_net_reduction
        self.meta_net = nn.Sequential(
            OrderedDict(
                [("linear1", nn.Linear(vis_dim, hidden)), ("relu", nn.ReLU(inplace=True)), ("linear2", nn.Linear(hidden, self.tower.width))]
            )
        ).to(device=vectors.device, dtype=vectors.dtype)
        self.set_classnames(classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Rebuild the class-dependent buffers for a new class list."""
        names = clean_classnames(classnames)
        plan = build_class_plan(names, self.tokenizer, self.n_ctx, self.prompt_prefix, "end", **plan_kwargs(self.tower))
        self.classnames = names
        self.text = PromptedTextEncoder(self.clip, plan).to(self.ctx.device)

    def image_shift(self, image_features: torch.Tensor) -> torch.Tensor:
        """Normalised image features [B, E] -> per-image context shift pi [B, D]."""
        x = image_features.to(self.ctx.dtype)
        if self.uses_reference:
            return self.meta_net(x)
        l1, l2 = self.meta_net.linear1, self.meta_net.linear2
        return condition(x, l1.weight, l1.bias, l2.weight, l2.bias, "relu", backend=self.op_backend, strict=False)

    def text_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """Normalised image features [B, E] -> L2-normalised text features [B, C, E] of every (image, class)."""
        shift = self.image_shift(image_features)
        if self.uses_reference:
            return self._reference_text(shift)
        B, C = shift.shape[0], len(self.classnames)
        ctx = self.ctx.unsqueeze(0).expand(B, -1, -1)  # pairs (b, c) for every image b and class c
        feats = self.text.fast_pairs(ctx, shift, "all", backend=self.op_backend, normalize=True)
        return feats.view(B, C, -1)

    def _reference_text(self, shift: torch.Tensor) -> torch.Tensor:
        # The official loops: per image, expand its shifted context to all classes and run the full tower.
        text, C = self.text, len(self.classnames)
        prefix, suffix = text.token_embeds[:, :1], text.token_embeds[:, 1 + self.n_ctx :]
        ctx_shifted = self.ctx.unsqueeze(0) + shift.unsqueeze(1)  # [B, M, D]
        out = []
        for ctx_i in ctx_shifted:
            prompts_i = torch.cat([prefix, ctx_i.unsqueeze(0).expand(C, -1, -1), suffix], dim=1)
            out.append(F.normalize(text.reference_features(prompts_i, text.token_ids), dim=-1))
        return torch.stack(out)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> logits [B, C]."""
        return self.logits_from_image_features(self.encode_images(images))

    def logits_from_image_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """[B, E] frozen image features as ``encode_images`` returns them -> logits [B, C] (the meta-net reads
        their normalised form, as in ``forward``; the feature store's entry point)."""
        image_features = F.normalize(image_features, dim=-1)
        text_features = self.text_features(image_features)
        return self.logit_scale * torch.einsum("be,bce->bc", image_features.to(text_features.dtype), text_features)

    # ------------------------------------------------------------------ plug-in protocol (see _family.py)
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> [B, E] unnormalised frozen image features (DePT hook)."""
        return self.encode_images(images)

    def class_text_features(self, image_features: torch.Tensor, class_shift=None) -> torch.Tensor:
        """Unnormalised image features [B, E] -> [B, C, E] unnormalised text features of every (image, class)
        (DePT hook). The meta-net reads the normalised image feature, as in CoCoOp."""
        if class_shift is not None:
            raise ValueError("CoCoOp's contexts are conditioned on the image; it takes no class shift")
        if image_features is None:
            raise ValueError("CoCoOp's text features need the batch's image features")
        shift = self.image_shift(F.normalize(image_features, dim=-1))
        text, C, B = self.text, len(self.classnames), shift.shape[0]
        if self.uses_reference:
            # The official loops, without the final normalisation.
            prefix, suffix = text.token_embeds[:, :1], text.token_embeds[:, 1 + self.n_ctx :]
            ctx_shifted = self.ctx.unsqueeze(0) + shift.unsqueeze(1)
            out = []
            for ctx_i in ctx_shifted:
                prompts_i = torch.cat([prefix, ctx_i.unsqueeze(0).expand(C, -1, -1), suffix], dim=1)
                out.append(text.reference_features(prompts_i, text.token_ids))
            return torch.stack(out)
        ctx = self.ctx.unsqueeze(0).expand(B, -1, -1)  # pairs (b, c) for every image b and class c
        return text.fast_pairs(ctx, shift, "all", backend=self.op_backend, normalize=False).view(B, C, -1)

    def logits_from_features(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v [B, E], t [B, C, E] (unnormalised) -> [B, C] = logit_scale * cos, per image."""
        return itm_logits(self.logit_scale, v, t)

    def loss_from_features(self, v, t, labels, itm_loss=None, params=None):
        """CoCoOp's objective from features: ``itm_loss(logits, labels)`` (cross-entropy by default)."""
        logits = self.logits_from_features(v, t)
        return (itm_loss or F.cross_entropy)(logits, labels), logits
