"""CoOp (Zhou et al., IJCV'22): learnable context vectors shared by all classes (or one set per class)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastprompt.classplan import CLASS_POSITIONS, build_class_plan, clean_classnames
from fastprompt.encoders.prompted_text import PromptedTextEncoder
from fastprompt.learners._common import context_init, plan_kwargs
from fastprompt.learners._family import check_shift, unified_fast_text, unified_reference_text
from fastprompt.learners._family import itm_logits
from fastprompt.learners.base import LearnerConfig, PromptLearner
from fastprompt.learners.registry import register_learner


@dataclass
class CoOpConfig(LearnerConfig):
    """Options named after CoOp's ``TRAINER.COOP.*`` keys, lower-cased (official defaults)."""

    n_ctx: int = 16
    ctx_init: str = ""  # e.g. "a photo of a": sets n_ctx to its word count and ignores csc, as CoOp does
    csc: bool = False  # class-specific contexts
    class_token_position: str = "end"  # "end" | "middle" | "front"
    init_std: float = 0.02

    def validate(self) -> None:
        super().validate()
        if self.class_token_position not in CLASS_POSITIONS:
            raise ValueError(f"class_token_position must be one of {CLASS_POSITIONS}")


@register_learner("coop")
class CoOp(PromptLearner):
    """CoOp learner. ``forward(images [B, 3, H, W]) -> logits [B, C]``; ``parameters()`` yields ``ctx``
    ([M, D], or [C, M, D] with ``csc``) as the only tensor that requires grad."""

    method = "coop"
    config_class = CoOpConfig
    training_defaults = {"epochs": None, "batch_size": 32, "lr": 0.002}  # few-shot: 50/100/200 epochs by shots
    tiny_setup = {"n_ctx": 2}
    image_conditional = False  # plug-in protocol (fastprompt/learners/_family.py)
    image_features_frozen = True  # logits see images only through encode_images (feature store)
    accepts_class_shift = True  # "end" position only

    def __init__(self, clip_model: nn.Module, classnames: Sequence[str], config=None, tokenizer=None, **kwargs):
        super().__init__(clip_model, classnames, config, tokenizer, **kwargs)
        config = self.config
        names = clean_classnames(classnames)
        csc = config.csc
        if config.ctx_init and csc:
            warnings.warn("CoOp ignores csc=True with ctx_init (one unified, word-initialised context)")
            csc = False
        self.csc = csc
        vectors, self.prompt_prefix, self.n_ctx = context_init(
            self.tower, self.tokenizer, config.ctx_init, config.n_ctx, csc, len(names), config.init_std
        )
        self.ctx = nn.Parameter(vectors)
        self.set_classnames(names)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Rebuild the class-dependent buffers for a new class list (e.g. new classes at test time)."""
        names = clean_classnames(classnames)
        if self.csc and len(names) != self.ctx.shape[0]:
            raise ValueError(f"class-specific contexts were learned for {self.ctx.shape[0]} classes, got {len(names)}")
        plan = build_class_plan(
            names, self.tokenizer, self.n_ctx, self.prompt_prefix, self.config.class_token_position,
            **plan_kwargs(self.tower),
        )
        self.classnames = names
        self.text = PromptedTextEncoder(self.clip, plan).to(self.ctx.device)
        self._text_cache = None

    # ------------------------------------------------------------------ text side
    def encode_text(self) -> torch.Tensor:
        """[C, E] L2-normalised class text features (cached in eval mode under no_grad)."""
        return self.cached_text_features(self._text_features)

    def _text_features(self) -> torch.Tensor:
        if self.uses_reference:
            return F.normalize(self._reference_text(), dim=-1)
        return self._fast_text()

    def _fast_text(self) -> torch.Tensor:
        """[C, E] normalised features through the fast engine."""
        if self.csc:  # one context per class: the diagonal pairs (c, c)
            return self.text.fast_pairs(self.ctx, None, "diagonal", backend=self.op_backend, normalize=True)
        return self.text.fast_pairs(self.ctx.unsqueeze(0), None, "shared", backend=self.op_backend, normalize=True)

    def text_features_for(self, class_indices: torch.Tensor) -> torch.Tensor:
        """class_indices [K] -> [K, E] L2-normalised text features of those classes only.

        Used by class-sharded training (``fastprompt.training.distributed``): each process encodes its slice
        of a large label space. The fast engine encodes only the K requested (context, class) pairs; the
        reference backend computes the official all-class prompts and slices them (same values, no saving).
        """
        idx = torch.as_tensor(class_indices, dtype=torch.long, device=self.ctx.device)
        if idx.dim() != 1:
            raise ValueError(f"class_indices must be 1-D, got shape {tuple(idx.shape)}")
        if self.uses_reference:
            return F.normalize(self._reference_text(), dim=-1)[idx]
        if self.csc:
            return self.text.fast_features(self.ctx, None, idx, idx, backend=self.op_backend, normalize=True)
        g_idx = torch.zeros_like(idx)
        return self.text.fast_features(self.ctx.unsqueeze(0), None, g_idx, idx, backend=self.op_backend, normalize=True)

    def _reference_text(self) -> torch.Tensor:
        # The official PromptLearner.forward: concatenation into full-length prompts.
        text, M = self.text, self.n_ctx
        C = len(self.classnames)
        ctx = self.ctx if self.csc else self.ctx.unsqueeze(0).expand(C, -1, -1)
        prefix = text.token_embeds[:, :1]
        suffix = text.token_embeds[:, 1 + M :]
        position = self.config.class_token_position
        if position == "end":
            prompts = torch.cat([prefix, ctx, suffix], dim=1)
        else:
            half = M // 2
            rows = []
            for c, name_len in enumerate(text.plan.name_lens):
                class_tokens, rest = suffix[c : c + 1, :name_len], suffix[c : c + 1, name_len:]
                if position == "middle":
                    parts = [prefix[c : c + 1], ctx[c : c + 1, :half], class_tokens, ctx[c : c + 1, half:], rest]
                else:
                    parts = [prefix[c : c + 1], class_tokens, ctx[c : c + 1], rest]
                rows.append(torch.cat(parts, dim=1))
            prompts = torch.cat(rows, dim=0)
        return text.reference_features(prompts, text.token_ids)

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> logits [B, C] = logit_scale * cos(image, class text)."""
        return self.logits_from_image_features(self.encode_images(images))

    def logits_from_image_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """[B, E] frozen image features as ``encode_images`` returns them -> logits [B, C] (what ``forward``
        computes from them; the feature store's entry point)."""
        image_features = F.normalize(image_features, dim=-1)
        text_features = self.encode_text()
        return self.logit_scale * image_features.to(text_features.dtype) @ text_features.t()

    # ------------------------------------------------------------------ plug-in protocol (see _family.py)
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> [B, E] unnormalised frozen image features (DePT / CaPT hook)."""
        return self.encode_images(images)

    def class_text_features(self, image_features=None, class_shift: Optional[torch.Tensor] = None) -> torch.Tensor:
        """-> [C, E] unnormalised class text features (DePT / CaPT hook).

        ``class_shift`` [C, D] (CaPT) is added to every context token of class c, as the CaPT code adds its
        class offsets to the expanded context; only the "end" position is supported there, as upstream.
        """
        if class_shift is None:
            if self.uses_reference:
                return self._reference_text()
            if self.csc:
                return self.text.fast_pairs(self.ctx, None, "diagonal", backend=self.op_backend, normalize=False)
            return self.text.fast_pairs(self.ctx.unsqueeze(0), None, "shared", backend=self.op_backend, normalize=False)
        if self.config.class_token_position != "end":
            raise ValueError(f"a class shift needs class_token_position='end', got {self.config.class_token_position!r}")
        check_shift(class_shift, len(self.classnames), self.tower.width)
        if not self.csc:
            if self.uses_reference:
                return unified_reference_text(self.text, self.ctx, class_shift)
            return unified_fast_text(self.text, self.ctx, class_shift, self.op_backend)
        text, M = self.text, self.n_ctx
        if self.uses_reference:
            ctx = self.ctx + class_shift.unsqueeze(1)
            prompts = torch.cat([text.token_embeds[:, :1], ctx, text.token_embeds[:, 1 + M :]], dim=1)
            return text.reference_features(prompts, text.token_ids)
        return text.fast_pairs(self.ctx, class_shift, "diagonal", backend=self.op_backend, normalize=False)

    def logits_from_features(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v [B, E], t [C, E] (unnormalised) -> [B, C] = logit_scale * cos."""
        return itm_logits(self.logit_scale, v, t)

    def loss_from_features(self, v, t, labels, itm_loss=None, params=None):
        """CoOp's objective from features: ``itm_loss(logits, labels)`` (cross-entropy by default)."""
        logits = self.logits_from_features(v, t)
        return (itm_loss or F.cross_entropy)(logits, labels), logits
