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
from fastprompt.learners._common import PromptLearner, config_from, context_init, plan_kwargs
from fastprompt.learners.registry import register_learner


@dataclass
class CoOpConfig:
    """Options named after CoOp's ``TRAINER.COOP.*`` keys, lower-cased (official defaults)."""

    n_ctx: int = 16
    ctx_init: str = ""  # e.g. "a photo of a": sets n_ctx to its word count and ignores csc, as CoOp does
    csc: bool = False  # class-specific contexts
    class_token_position: str = "end"  # "end" | "middle" | "front"
    init_std: float = 0.02
    backend: Optional[str] = None  # None: FASTPROMPT_BACKEND or "auto"


@register_learner("coop")
class CoOp(PromptLearner):
    """CoOp learner. ``forward(images [B, 3, H, W]) -> logits [B, C]``; ``parameters()`` yields ``ctx``
    ([M, D], or [C, M, D] with ``csc``) as the only tensor that requires grad."""

    method = "coop"
    config_class = CoOpConfig

    def __init__(self, clip_model: nn.Module, classnames: Sequence[str], config=None, tokenizer=None, **kwargs):
        config = config_from(CoOpConfig, config, kwargs)
        if config.class_token_position not in CLASS_POSITIONS:
            raise ValueError(f"class_token_position must be one of {CLASS_POSITIONS}")
        super().__init__(clip_model, classnames, config, tokenizer)
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
        C = len(self.classnames)
        c_idx = torch.arange(C, device=self.ctx.device)
        if self.csc:  # one context per class: the diagonal pairs (c, c)
            return self.text.fast_features(self.ctx, None, c_idx, c_idx, backend=self.op_backend, normalize=True)
        g_idx = torch.zeros(C, dtype=torch.long, device=self.ctx.device)
        return self.text.fast_features(self.ctx.unsqueeze(0), None, g_idx, c_idx, backend=self.op_backend, normalize=True)

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
        image_features = F.normalize(self.encode_images(images), dim=-1)
        text_features = self.encode_text()
        return self.logit_scale * image_features.to(text_features.dtype) @ text_features.t()
