"""PromptSRC (Khattak et al., ICCV'23): self-regulating prompts over IVLP deep prompts.

Prompts are IVLP's (independent, 4 text + 4 vision tokens, depth 9). Training adds three self-consistency
terms that pull the prompted model towards frozen CLIP, plus Gaussian prompt aggregation (GPA):

* ``L_ce = CE(logit_scale * cos(v, t), y)`` on prompted image features v and class text features t;
* ``25 * L1(t/|t|, f/|f|)`` (mean over [C, E]), f = frozen CLIP text features averaged over the 60 ImageNet
  templates (``fastprompt.templates.IMAGENET_TEMPLATES``), computed once per class list;
* ``10 * L1(v/|v|, z/|z|)`` (mean over [B, E]), z = frozen CLIP image features of the same images;
* ``KL(p_zs || p) = sum p_zs (log p_zs - log p) / (B * C)`` at T = 1, with p_zs = softmax(logit_scale * cos(z, f)).
* GPA: after epoch e (1-based) the trainable tensors are added with weight N(e; mu, sigma) / sum_e' N(e'; mu, sigma);
  after the last epoch the aggregate replaces them and is what evaluation uses (``on_epoch_end``).

Official base-to-new config: SGD lr 0.0025, batch 4, 20 epochs, GPA mu=15, sigma=1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastprompt.learners._deep_prompts import (
    GaussianPromptAggregation, IndependentPrompts, check_images, cosine_logits, IndependentPromptLearner,
    prompted_image_features,
)
from fastprompt.learners._family import CosineClassifier
from fastprompt.learners.base import LearnerConfig, PromptLearner
from fastprompt.learners.registry import register_learner
from fastprompt.templates import format_prompts, imagenet_templates


@dataclass
class PromptSRCConfig(LearnerConfig):
    """``TRAINER.PROMPTSRC.*`` of ``configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml``."""

    n_ctx_text: int = 4
    n_ctx_vision: int = 4
    ctx_init: str = "a photo of a"
    prompt_depth_text: int = 9
    prompt_depth_vision: int = 9
    text_loss_weight: float = 25.0
    image_loss_weight: float = 10.0
    gpa_mean: float = 15.0  # cross-dataset: 6 / 10 (depth 3); few-shot: 30 / 30 or 45 / 5 over 50 epochs
    gpa_std: float = 1.0
    init_std: float = 0.02


@register_learner("promptsrc")
class PromptSRC(IndependentPromptLearner, CosineClassifier, PromptLearner):
    """PromptSRC learner. ``forward(images [B, 3, H, W]) -> logits [B, C]``; ``compute_loss(images, labels)``
    returns the full PromptSRC objective. Trainable (under ``prompts``): ``ctx``, ``text_deep``, ``vpt``,
    ``vpt_deep`` (46,080 values on ViT-B/16 at the defaults). Hooks: ``image_features(images) -> [B, E]``,
    ``text_features(class_idx=None) -> [C or K, E]`` (unnormalised), and the plug-in protocol of ``_family.py``.
    """

    method = "promptsrc"
    config_class = PromptSRCConfig
    training_defaults = {"epochs": 20, "batch_size": 4, "lr": 0.0025}
    tiny_setup = {"n_ctx_text": 2, "n_ctx_vision": 2, "prompt_depth_text": 2, "prompt_depth_vision": 2}
    image_conditional = False  # plug-in protocol (fastprompt/learners/_family.py)

    def __init__(self, clip_model: nn.Module, classnames: Sequence[str], config=None, tokenizer=None, **kwargs):
        super().__init__(clip_model, classnames, config, tokenizer, **kwargs)
        config = self.config
        self.prompts = IndependentPrompts.from_config(self, config)
        self.gpa = GaussianPromptAggregation(config.gpa_mean, config.gpa_std)
        self._fixed_text = None
        self._frozen_batch = None
        self.set_classnames(classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Rebuild the class-dependent text buffers; the frozen template features are recomputed on next use."""
        super().set_classnames(classnames)
        self._fixed_text = None

    # ------------------------------------------------------------------ frozen references
    def fixed_text_features(self) -> torch.Tensor:
        """[C, E] frozen CLIP text features averaged (unnormalised) over the 60 ImageNet templates, as the
        official ``fixed_embeddings`` (computed on first use: 60 x C frozen text passes)."""
        if self._fixed_text is None:
            templates = imagenet_templates()
            C = len(self.classnames)
            texts = [p for t in templates for p in format_prompts(t, self.classnames)]  # template-major
            feats = self.frozen_text_features(texts).view(len(templates), C, -1)
            self._fixed_text = feats.mean(dim=0)
        return self._fixed_text

    def set_fixed_text_features(self, features: torch.Tensor) -> None:
        """Use precomputed frozen template features [C, E] (e.g. cached on disk for a large class list)."""
        C = len(self.classnames)
        if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[0] != C:
            got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"fixed text features must be [{C}, E], got {got}")
        self._fixed_text = features.detach()

    def frozen_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, E] unnormalised features of the frozen (unprompted) CLIP image tower, no grad.
        The official code keeps a second copy of the vision tower for this; it is the same frozen weights."""
        return self.encode_images(check_images(self, images))

    # ------------------------------------------------------------------ plug-in hooks
    # text_features, class_text_features: IndependentPromptLearner; logits, encode_text: CosineClassifier.

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, E] unnormalised prompted image features. In training mode the frozen features
        of the same images are computed too and kept for :meth:`loss_from_features` (the official forward)."""
        feats = prompted_image_features(self, images, self.prompts.vision_prompts())
        self._frozen_batch = self.frozen_image_features(images) if self.training else None
        return feats

    def loss_from_features(self, v, t, labels, itm_loss=None, params=None, frozen_image_features=None):
        """PromptSRC's objective from prompted features v [B, E] and t [C, E] (unnormalised).

        ``itm_loss(logits, labels)`` replaces the cross-entropy term (CaPT / DePT); the SRC terms are kept.
        ``frozen_image_features`` [B, E] default to those computed by the last :meth:`image_features` call in
        training mode.
        """
        z = frozen_image_features if frozen_image_features is not None else self._frozen_batch
        if z is None or z.shape[0] != v.shape[0]:
            raise ValueError(
                "PromptSRC's loss needs the frozen image features of this batch: call image_features(images) in "
                "training mode first, or pass frozen_image_features="
            )
        if not isinstance(labels, torch.Tensor) or labels.shape != (v.shape[0],):
            raise ValueError(f"labels must be a [{v.shape[0]}] tensor, got {getattr(labels, 'shape', labels)}")
        cfg = self.config
        logits = self.logits_from_features(v, t)
        loss_ce = (itm_loss or F.cross_entropy)(logits, labels)
        t_n, v_n = F.normalize(t, dim=-1), F.normalize(v, dim=-1)
        fixed = F.normalize(self.fixed_text_features().to(t.dtype), dim=-1)
        z_n = F.normalize(z.to(v.dtype), dim=-1)
        loss_text = F.l1_loss(t_n, fixed, reduction="mean") * cfg.text_loss_weight
        loss_image = F.l1_loss(v_n, z_n, reduction="mean") * cfg.image_loss_weight
        with torch.no_grad():
            zs_logits = self.logit_scale * z_n.to(fixed.dtype) @ fixed.t()
        # KL(p_zs || p) summed and divided by B * C, at temperature 1 (F.kl_div with log-probability target).
        loss_kl = F.kl_div(
            F.log_softmax(logits, dim=1), F.log_softmax(zs_logits.to(logits.dtype), dim=1), reduction="sum", log_target=True
        ) / logits.numel()
        return loss_ce + loss_kl + loss_text + loss_image, logits

    # ------------------------------------------------------------------ training interface
    def compute_loss(self, images: torch.Tensor, labels: torch.Tensor):
        """images [B, 3, H, W], labels [B] -> (PromptSRC loss [], logits [B, C])."""
        v = prompted_image_features(self, images, self.prompts.vision_prompts())
        z = self.frozen_image_features(images)
        return self.loss_from_features(v, self.text_features(), labels, frozen_image_features=z)

    def on_epoch_end(self, epoch: int, max_epoch: int) -> None:
        """GPA: add this epoch's trainable tensors with their Gaussian weight; after the last epoch
        (``epoch == max_epoch - 1``) the aggregate replaces them, and evaluation uses it."""
        if self.gpa.update(self, epoch, max_epoch):
            self._text_cache = None

    def training_state_dict(self) -> dict:
        """GPA's running state for an exact resume (the trainer checkpoints it every epoch):
        ``{"gpa_sums": {name: [..] tensor} | None, "gpa_max_epoch": int | None}``. The sums are sum_e w_e *
        theta_e over the finished epochs (None before the first epoch and after the last, when the aggregate
        has already replaced the trainable tensors)."""
        sums = self.gpa.sums
        return {
            "gpa_sums": None if sums is None else {k: v.detach().cpu().clone() for k, v in sums.items()},
            "gpa_max_epoch": self.gpa.max_epoch,
        }

    def load_training_state_dict(self, state: dict) -> None:
        """Restore :meth:`training_state_dict` (the sums go to the trainable tensors' device, in their stored
        dtype, so the aggregate continues bit-identically)."""
        if not isinstance(state, dict) or set(state) != {"gpa_sums", "gpa_max_epoch"}:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"PromptSRC training state must hold 'gpa_sums' and 'gpa_max_epoch', got {got}")
        sums, max_epoch = state["gpa_sums"], state["gpa_max_epoch"]
        if sums is None:
            self.gpa.sums, self.gpa.max_epoch = None, None if max_epoch is None else int(max_epoch)
            return
        own = {n: p for n, p in self.named_parameters() if p.requires_grad}
        if set(sums) != set(own):
            raise ValueError(f"GPA sums do not match PromptSRC's trainable tensors: missing {sorted(set(own) - set(sums))}, "
                             f"unexpected {sorted(set(sums) - set(own))}")
        for n, v in sums.items():
            if tuple(v.shape) != tuple(own[n].shape):
                raise ValueError(f"GPA sum {n}: shape {tuple(v.shape)} != {tuple(own[n].shape)}")
        self.gpa.sums = {n: v.detach().to(own[n].device).clone() for n, v in sums.items()}
        self.gpa.max_epoch = None if max_epoch is None else int(max_epoch)


    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> logits [B, C]."""
        v = prompted_image_features(self, images, self.prompts.vision_prompts())
        return cosine_logits(self, v, self.encode_text())
