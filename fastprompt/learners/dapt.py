"""DAPT (Cho et al., ICCV'23): distribution-aware prompt tuning (``mlvlab/DAPT``), a CaPT baseline.

Prompts on both encoders, each with a dispersion regulariser:

* text: ``txt_ctx`` [Mt, Dt] (16 random N(0, 0.02) tokens) -> ``[SOS] ctx <name>. [EOT]``;
  ``L_t = mean_{i<j} exp(-t * |t_i - t_j|^2)`` over the normalised class text features (an RBF repulsion
  that spreads the classes apart; t = 2);
* vision: ``vis_ctx`` [1, Mv, Dv] (16 tokens, uniform(+-sqrt(6 / (3 p^2 + Dv))) as in VPT) inserted right after
  the CLS token *after* ``ln_pre`` (shallow: only the input of block 0);
  ``L_i = MSE(v/|v|, proto[y])`` pulls each prompted image feature towards its class prototype, the mean of
  the class's normalised frozen image features over the training set.
* loss = CE + 0.1 * L_i + 0.1 * L_t.

Prototypes come from :meth:`attach_train_data` (a ``DatasetSplits``; the trainer calls it) or
:meth:`set_prototypes` (precomputed, [C, E]). Official config: batch 32, 200 epochs (8/16 shots).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from fastprompt.encoders.prompted_vision import PromptedVisionEncoder
from fastprompt.learners._deep_prompts import (
    build_text_encoder, check_images, cosine_logits, deep_text_features, official_context_init, visual_width,
)
from fastprompt.learners._family import itm_logits
from fastprompt.learners.base import LearnerConfig, PromptLearner
from fastprompt.learners.registry import register_learner


# DAPT's own few-shot scripts (mlvlab/DAPT configs/trainers/DAPT/vit_b16*.yaml, configs/datasets/*.yaml,
# scripts/main.sh): batch 32, 50 / 100 / 200 epochs by shots as CoOp (ImageNet 50), and a per-dataset lr and
# VIS_BETA / TXT_BETA. A dataset outside that table gets lr 0.002 (CoOp's; DAPT has no generic value).
DAPT_LR: Dict[str, float] = {
    "caltech101": 0.2, "dtd": 20.0, "eurosat": 20.0, "fgvc_aircraft": 2.0, "food101": 20.0, "imagenet": 2.0,
    "oxford_flowers": 0.002, "oxford_pets": 0.02, "stanford_cars": 0.002, "sun397": 20.0, "ucf101": 20.0,
}
DAPT_BETAS: Dict[str, Dict[str, float]] = {
    "caltech101": {"vis_beta": 10.0, "txt_beta": 0.01}, "dtd": {"vis_beta": 100.0, "txt_beta": 0.01},
    "eurosat": {"vis_beta": 100.0, "txt_beta": 10.0}, "fgvc_aircraft": {"vis_beta": 100.0, "txt_beta": 0.01},
    "food101": {"vis_beta": 10.0, "txt_beta": 0.01}, "imagenet": {"vis_beta": 0.01, "txt_beta": 0.01},
    "oxford_flowers": {"vis_beta": 10.0, "txt_beta": 0.01}, "oxford_pets": {"vis_beta": 10.0, "txt_beta": 0.1},
    "stanford_cars": {"vis_beta": 100.0, "txt_beta": 0.1}, "sun397": {"vis_beta": 100.0, "txt_beta": 0.01},
    "ucf101": {"vis_beta": 0.1, "txt_beta": 0.1},
}

@dataclass
class DAPTConfig(LearnerConfig):
    """``TRAINER.DAPT.*`` of the official ``train.py``, lower-cased."""

    vis_num_tokens: int = 16
    vis_dropout: float = 0.0
    vis_beta: float = 0.1
    txt_num_tokens: int = 16
    txt_rbf_t: float = 2.0
    txt_beta: float = 0.1
    init_std: float = 0.02

    def validate(self) -> None:
        super().validate()
        if self.vis_num_tokens < 1 or self.txt_num_tokens < 1:
            raise ValueError(f"vis_num_tokens and txt_num_tokens must be >= 1, got {self.vis_num_tokens}, {self.txt_num_tokens}")
        if not 0.0 <= self.vis_dropout < 1.0:
            raise ValueError(f"vis_dropout must be in [0, 1), got {self.vis_dropout}")


@register_learner("dapt")
class DAPT(PromptLearner):
    """DAPT learner. ``forward(images [B, 3, H, W]) -> logits [B, C]``; ``compute_loss`` adds the two
    dispersion terms. Trainable: ``txt_ctx`` [Mt, Dt], ``vis_ctx`` [1, Mv, Dv]. Hooks (unnormalised):
    ``image_features(images) -> [B, E]``, ``text_features() -> [C, E]`` and the ``_family.py`` protocol."""

    method = "dapt"
    config_class = DAPTConfig
    # Few-shot (subsample "all") from DAPT's repo; base-to-new (subsample base/new) from CaPT's DAPT baseline
    # (UCPDAPT: batch 4, lr 0.0035, 10 epochs, the learner's default betas).
    training_defaults = {"epochs": None, "batch_size": 32, "lr": 0.002, "lr_by_dataset": DAPT_LR,
                         "learner_by_dataset": DAPT_BETAS, "base2new": {"epochs": 10, "batch_size": 4, "lr": 0.0035}}
    tiny_setup = {"vis_num_tokens": 2, "txt_num_tokens": 2}
    tiny_needs_data = True  # the class prototypes

    def bench_prepare(self, generator: torch.Generator) -> None:
        """Random unit prototypes (the benchmark has no images to average)."""
        E = int(self.clip.visual.output_dim)
        protos = F.normalize(torch.randn(len(self.classnames), E, generator=generator), dim=-1)
        self.set_prototypes(protos.to(self.txt_ctx.device))
    image_conditional = False  # plug-in protocol (fastprompt/learners/_family.py)
    accepts_class_shift = True

    def __init__(self, clip_model: nn.Module, classnames: Sequence[str], config=None, tokenizer=None, **kwargs):
        super().__init__(clip_model, classnames, config, tokenizer, **kwargs)
        config = self.config
        visual = self.clip.visual
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise ValueError("DAPT's visual prompts need a ViT that pools the CLS token (pool_type 'tok')")
        vectors, self.prompt_prefix = official_context_init(self.tower, self.tokenizer, "", config.txt_num_tokens, config.init_std)
        self.n_ctx = config.txt_num_tokens
        self.txt_ctx = nn.Parameter(vectors)
        dv = visual_width(self.clip)
        patch = visual.conv1.weight.shape[-2] * visual.conv1.weight.shape[-1]
        val = math.sqrt(6.0 / float(3 * patch + dv))  # VPT's xavier-uniform bound
        vis = torch.empty(1, config.vis_num_tokens, dv, dtype=vectors.dtype, device=vectors.device)
        self.vis_ctx = nn.Parameter(nn.init.uniform_(vis, -val, val))
        self.vpt_dropout = nn.Dropout(config.vis_dropout)
        self.register_buffer("prototypes", None, persistent=False)
        self.set_classnames(classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Rebuild the class-dependent text buffers (prototypes are dropped if the class count changes)."""
        self.classnames, self.text = build_text_encoder(self, classnames, self.n_ctx, self.prompt_prefix)
        if self.prototypes is not None and self.prototypes.shape[0] != len(self.classnames):
            self.prototypes = None
        self._text_cache = None

    # ------------------------------------------------------------------ prototypes
    def set_prototypes(self, prototypes: torch.Tensor) -> None:
        """Per-class visual prototypes [C, E]: the mean of each class's L2-normalised frozen image features."""
        C, E = len(self.classnames), int(self.clip.visual.output_dim)
        if not isinstance(prototypes, torch.Tensor) or tuple(prototypes.shape) != (C, E):
            got = tuple(prototypes.shape) if isinstance(prototypes, torch.Tensor) else type(prototypes).__name__
            raise ValueError(f"prototypes must be a [{C}, {E}] tensor, got {got}")
        self.prototypes = prototypes.detach().to(device=self.txt_ctx.device, dtype=self.txt_ctx.dtype)

    # The prototypes are derived from the training images, but they go into the trainer's checkpoint anyway:
    # a resumed run then continues with the very tensors the interrupted one used (no second pass over the
    # training set, and no dependence on the image pipeline being bit-reproducible, e.g. on GPU).
    training_state_includes_train_data = True  # the trainer skips attach_train_data after restoring this state

    def training_state_dict(self) -> Optional[dict]:
        """``{"prototypes": [C, E] tensor}`` for the trainer's checkpoint (exact resume); None while there are
        no prototypes (a resumed run then builds them with ``attach_train_data`` as a fresh one does)."""
        if self.prototypes is None:
            return None
        return {"prototypes": self.prototypes.detach().cpu().clone()}

    def load_training_state_dict(self, state: dict) -> None:
        """Restore :meth:`training_state_dict` (shape-checked by :meth:`set_prototypes`)."""
        if not isinstance(state, dict) or set(state) != {"prototypes"} or not isinstance(state["prototypes"], torch.Tensor):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"DAPT training state must be {{'prototypes': [C, E] tensor}}, got {got}")
        self.set_prototypes(state["prototypes"])

    def prototypes_from_features(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Frozen image features [N, E] (unnormalised) and labels [N] -> prototypes [C, E] (official: the
        per-class mean of the normalised features, not renormalised). Every class needs an image."""
        C = len(self.classnames)
        labels = torch.as_tensor(labels, dtype=torch.long, device=features.device)
        if labels.shape != (features.shape[0],) or labels.min() < 0 or labels.max() >= C:
            raise ValueError(f"labels must be [N] in 0..{C - 1} for features {tuple(features.shape)}")
        counts = torch.bincount(labels, minlength=C)
        if bool((counts == 0).any()):
            raise ValueError(f"classes {torch.nonzero(counts == 0).flatten().tolist()} have no training image")
        f = F.normalize(features, dim=-1)
        sums = torch.zeros(C, f.shape[1], dtype=f.dtype, device=f.device).index_add_(0, labels, f)
        return sums / counts.unsqueeze(1).to(f.dtype)

    def attach_train_data(self, dataset, transform=None, batch_size: int = 64) -> None:
        """Build the prototypes from a ``fastprompt.datasets.base.DatasetSplits`` (its ``train_x``) with the
        frozen image tower. ``transform`` maps a PIL image to a [3, H, W] tensor (default: open_clip's
        evaluation transform for this tower; the official code draws one augmented view with the training
        transform)."""
        items = getattr(dataset, "train_x", None)
        if not items:
            raise ValueError("DAPT needs a dataset with training images (DatasetSplits.train_x) for its prototypes")
        transform = transform or _default_transform(self.clip.visual)
        feats, labels = [], []
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            imgs = torch.stack([transform(Image.open(d.impath).convert("RGB")) for d in chunk])
            feats.append(self.encode_images(imgs.to(self.txt_ctx.device)))
            labels.extend(d.label for d in chunk)
        self.set_prototypes(self.prototypes_from_features(torch.cat(feats), torch.tensor(labels)))

    # ------------------------------------------------------------------ features
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, E] unnormalised prompted image features (the official ``ImageEncoder``).

        The prompts enter once (shallow), right after the CLS token and *after* ``ln_pre``, so they are not
        normalised. Reference backend: the official code below (``ln_pre``, concatenate [CLS, prompts,
        patches], the tower's transformer, ``ln_post`` on CLS, ``proj``). Other backends: the prompted vision
        encoder's fast path with ``after_ln_pre`` (the same function; SDPA attention, prompt rows moved to the
        end, and the last block computed for the CLS row only).
        """
        x = check_images(self, images)
        if not self.uses_reference:
            ctx = self.vpt_dropout(self.vis_ctx.expand(x.shape[0], -1, -1))  # [B, Mv, Dv]: per-image dropout masks
            return self._vision_encoder()(x, {0: ctx}, fast=True)
        visual = self.clip.visual
        x = visual._embeds(x)  # conv1, CLS, positional embedding, patch dropout, ln_pre: [B, 1 + P, Dv]
        ctx = self.vpt_dropout(self.vis_ctx.expand(x.shape[0], -1, -1)).to(x.dtype)
        x = torch.cat([x[:, :1], ctx, x[:, 1:]], dim=1)
        x = visual.transformer(x)
        pooled, _ = visual._pool(x)  # CLS token (pool_type "tok"), ln_post
        return pooled @ visual.proj if visual.proj is not None else pooled

    def _vision_encoder(self):
        """The fast image path: prompts after CLS, after ``ln_pre``. Built on first use and kept outside the
        module tree (it only views ``self.clip.visual``, so it adds no parameters or state-dict keys)."""
        enc = self.__dict__.get("_dapt_vision")
        if enc is None or enc.visual is not self.clip.visual:
            enc = PromptedVisionEncoder(self.clip.visual, "after_cls", after_ln_pre=True)
            object.__setattr__(self, "_dapt_vision", enc)
        return enc

    def text_features(self) -> torch.Tensor:
        """[C, E] unnormalised prompted class text features."""
        return self.class_text_features()

    def class_text_features(self, image_features=None, class_shift: Optional[torch.Tensor] = None) -> torch.Tensor:
        """-> [C, E] unnormalised class text features; ``class_shift`` [C, Dt] (CaPT) is added to every one of
        the context tokens of class c, as CaPT's DAPT plug-in does."""
        return deep_text_features(self, self.text, self.txt_ctx, {}, class_shift)

    def encode_text(self) -> torch.Tensor:
        """[C, E] L2-normalised text features (cached in eval mode under no_grad)."""
        return self.cached_text_features(lambda: F.normalize(self.text_features(), dim=-1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> logits [B, C]."""
        return cosine_logits(self, self.image_features(images), self.encode_text())

    # ------------------------------------------------------------------ objective
    def logits_from_features(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v [B, E], t [C, E] (unnormalised) -> [B, C] = logit_scale * cos."""
        return itm_logits(self.logit_scale, v, t)

    def dispersion_losses(self, v: torch.Tensor, t: torch.Tensor, labels: torch.Tensor):
        """(visual prototype MSE [], text RBF dispersion []) for unnormalised v [B, E], t [C, E]."""
        if self.prototypes is None:
            raise ValueError("DAPT's loss needs class prototypes: call attach_train_data(dataset) or set_prototypes()")
        v_n, t_n = F.normalize(v, dim=-1), F.normalize(t, dim=-1)
        loss_i = F.mse_loss(v_n, self.prototypes[labels].to(v_n.dtype))
        # Official: pdist in float32 from fp16 features; keep float64 when the model is float64.
        t_w = t_n.to(torch.promote_types(t_n.dtype, torch.float32))
        if t_w.shape[0] < 2:
            raise ValueError("DAPT's text dispersion needs at least 2 classes")
        loss_t = torch.pdist(t_w, p=2).pow(2.0).mul(-self.config.txt_rbf_t).exp().mean()
        return loss_i, loss_t

    def loss_from_features(self, v, t, labels, itm_loss=None, params=None):
        """CE (or ``itm_loss``) + vis_beta * prototype MSE + txt_beta * text RBF dispersion -> (loss, logits)."""
        if not isinstance(labels, torch.Tensor) or labels.shape != (v.shape[0],):
            raise ValueError(f"labels must be a [{v.shape[0]}] tensor, got {getattr(labels, 'shape', labels)}")
        logits = self.logits_from_features(v, t)
        loss_i, loss_t = self.dispersion_losses(v, t, labels)
        loss = (itm_loss or F.cross_entropy)(logits, labels) + self.config.vis_beta * loss_i + self.config.txt_beta * loss_t
        return loss, logits

    def compute_loss(self, images: torch.Tensor, labels: torch.Tensor):
        """images [B, 3, H, W], labels [B] -> (DAPT loss [], logits [B, C])."""
        return self.loss_from_features(self.image_features(images), self.text_features(), labels)


def _default_transform(visual):
    size = getattr(visual, "image_size", 224)
    mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return open_clip.image_transform(size, is_train=False, mean=mean, std=std)
