"""ProGrad (Zhu et al., ICCV'23): prompt-aligned gradient, as used as a CaPT baseline.

CoOp's prompt ("end" position, one shared context) is trained on the cross-entropy, but each trainable tensor's
gradient is projected away from the direction that conflicts with zero-shot CLIP's knowledge
(``prograd_backward_and_update`` in BeierZhu/Prompt-align and Koorye/CaPT):

    a = d CE / d p,   b = d KD / d p,   KD = mean_b sum_c -softmax(z_zs / T) log_softmax(z / T) T^2
    grad p = a - lambda (a . b^) b^   if cos(a, b) < 0,   else a        (b^ = b / |b|; per tensor)

where z_zs are the zero-shot CLIP logits ``logit_scale * cos(image, template feature)`` with ProGrad's own
template table (``PROGRAD_TEMPLATES``: "a type of pet, a photo of a {}." etc.).

The update needs two backward passes and a projection; a generic trainer loop (``loss.backward();
optimizer.step()``) gets it because :meth:`ProGrad.loss_from_features` computes both gradients with
``torch.autograd.grad`` and returns a *surrogate* loss whose value is the CE and whose gradient with respect to
every trainable tensor is the projected gradient: ``CE.detach() + sum_p <p, g_p> - sum_p <p, g_p>.detach()``.
The CE and KD values of the last step are kept in ``self.last_losses``.

We follow the CaPT repository's ProGrad (the baseline CaPT reports): M = 4 initialised from "a photo of a" (the
official ProGrad derives the init phrase from the dataset template); when ``n_ctx`` exceeds the phrase's words
the phrase fills the last positions and the others start at zero, as both codes do. T = 1, lambda = 1.
The teacher uses the same frozen CLIP (the official code loads an fp32 copy).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastprompt.learners._common import context_init
from fastprompt.learners._family import UnifiedContext, rebuild_unified_prompts
from fastprompt.learners.base import LearnerConfig, PromptLearner
from fastprompt.learners.registry import register_learner
from fastprompt.losses import distillation_ce, project_gradient
from fastprompt.templates import PROGRAD_TEMPLATES, template_for



@dataclass
class ProGradConfig(LearnerConfig):
    """CaPT's ProGrad baseline config (``ProGrad/vit_b16_ep10_ctx_batch4``: lr 0.0035, BS 4, 10 epochs)."""

    n_ctx: int = 4
    ctx_init: str = "a photo of a"
    dataset: str = ""  # picks the teacher template in PROGRAD_TEMPLATES ("" or unknown: "a photo of a {}.")
    template: Optional[str] = None  # overrides the dataset's teacher template
    T: float = 1.0  # distillation temperature (LOSS.T)
    prograd_lambda: float = 1.0  # projection strength (LOSS.LAMBDA)
    init_std: float = 0.02

    def validate(self) -> None:
        super().validate()
        if self.T <= 0:
            raise ValueError(f"T must be > 0, got {self.T}")
        if self.template is not None and "{}" not in self.template:
            raise ValueError(f"template {self.template!r} has no '{{}}' slot for the class name")


def _padded_context(tower, tokenizer, ctx_init: str, n_ctx: int, std: float):
    """ProGrad's init: the phrase's word embeddings in the last positions, zeros before them."""
    if not ctx_init:
        return context_init(tower, tokenizer, "", n_ctx, False, 1, std)
    words, prefix, k = context_init(tower, tokenizer, ctx_init, n_ctx, False, 1, std)
    if n_ctx < k:
        raise ValueError(f"n_ctx ({n_ctx}) must be >= the words of ctx_init ({k}, {ctx_init!r})")
    vectors = torch.zeros(n_ctx, words.shape[1], dtype=words.dtype, device=words.device)
    vectors[n_ctx - k :] = words
    return vectors, " ".join(["X"] * (n_ctx - k) + [prefix]), n_ctx


@register_learner("prograd")
class ProGrad(UnifiedContext, PromptLearner):
    """ProGrad learner. ``forward(images) -> logits [B, C]``; ``compute_loss`` returns the projected-gradient
    surrogate loss (see module doc). Trainable: ``ctx`` [M, D]. Buffer ``teacher_features`` [C, E]."""

    config_class = ProGradConfig
    # CaPT's ProGrad baseline (ProGrad/vit_b16_ep10_ctx_batch4)
    training_defaults = {"epochs": 10, "batch_size": 4, "lr": 0.0035}
    tiny_setup = {}

    @classmethod
    def bench_setup(cls, classnames, dataset="imagenet", tasks=2):
        return list(classnames), {"dataset": dataset}  # its hand-crafted template
    image_conditional = False
    image_features_frozen = True  # logits see images only through encode_images (feature store)

    def __init__(self, clip_model: nn.Module, classnames: Sequence[str], config=None, tokenizer=None, **kwargs):
        super().__init__(clip_model, classnames, config, tokenizer, **kwargs)
        config = self.config
        vectors, self.prompt_prefix, self.n_ctx = _padded_context(
            self.tower, self.tokenizer, config.ctx_init, config.n_ctx, config.init_std
        )
        self.ctx = nn.Parameter(vectors)
        self.last_losses: Dict[str, torch.Tensor] = {}
        self.set_classnames(classnames)

    @property
    def template(self) -> str:
        return self.config.template or template_for(self.config.dataset or "", PROGRAD_TEMPLATES)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Rebuild the prompts and the zero-shot teacher's class features for a new class list."""
        self.register_buffer("teacher_features", rebuild_unified_prompts(self, classnames, self.template), persistent=False)

    # ------------------------------------------------------------------ plug-in protocol (see _family.py)
    # image_features, class_text_features, logits, encode_text, forward, compute_loss: UnifiedContext.

    def teacher_logits(self, v: torch.Tensor) -> torch.Tensor:
        """[B, E] unnormalised image features -> [B, C] zero-shot CLIP logits (no gradient)."""
        with torch.no_grad():
            return self.logit_scale * F.normalize(v, dim=-1).to(self.teacher_features.dtype) @ self.teacher_features.t()

    def loss_from_features(self, v, t, labels, itm_loss=None, params=None):
        """ProGrad's step from features -> (surrogate loss [], logits [B, C]).

        ``itm_loss(logits, labels)`` is the task loss whose gradient is projected (CE; CaPT: margin-ITM).
        ``params``: the tensors to project (default: this learner's trainable tensors; a plug-in passes its own
        list, which includes its extra parameters). Without autograd (eval) it returns the task loss.
        """
        logits = self.logits_from_features(v, t)
        xe = (itm_loss or F.cross_entropy)(logits, labels)
        kd = distillation_ce(logits, self.teacher_logits(v), self.config.T)
        self.last_losses = {"xe": xe.detach(), "kl": kd.detach()}
        params = [p for p in self.parameters() if p.requires_grad] if params is None else list(params)
        if not torch.is_grad_enabled() or not xe.requires_grad or not params:
            return xe, logits
        grads_a = torch.autograd.grad(xe, params, retain_graph=True, allow_unused=True)
        grads_b = torch.autograd.grad(kd, params, retain_graph=False, allow_unused=True)
        surrogate = None
        for p, a, b in zip(params, grads_a, grads_b):
            a = torch.zeros_like(p) if a is None else a
            b = torch.zeros_like(p) if b is None else b
            g = project_gradient(a, b, self.config.prograd_lambda)
            term = (p * g).sum()
            surrogate = term if surrogate is None else surrogate + term
        # Value: exactly the task loss (x - x.detach() is 0); gradient w.r.t. p: exactly the projected g_p.
        return xe.detach() + (surrogate - surrogate.detach()), logits
