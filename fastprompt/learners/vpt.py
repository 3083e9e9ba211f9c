"""VPT (Jia et al., ECCV'22): learnable prompt tokens in a frozen ViT, shallow (block 0) or deep (every block).

Official code: ``KMnP/vpt`` (``src/models/vit_prompt/vit.py::PromptedTransformer``). Semantics kept:

* prompts ``[1, N, D]`` go right after the CLS token, after the positional embedding (no positional code);
  deep prompts ``[L - 1, N, D]`` *overwrite* the N prompt rows before blocks 1..L-1;
* init ``uniform(-v, v)``, ``v = sqrt(6 / (3 * patch_h * patch_w + D))`` (xavier-uniform with VPT's fan-in);
* prompt dropout (``PROMPT.DROPOUT``) on the prompts *expanded to the batch* (one mask per sample);
* the backbone always runs in eval mode; only the prompts (and a classifier head) learn.

Two uses:

* :class:`VPT` (``create_learner("vpt", clip_model, classnames)``) — a prompt learner on an open_clip CLIP: the
  prompted image encoder against frozen class text features (one template, computed once per class list);
  logits = logit_scale * cos.
* :class:`VPTClassifier` (``VPTClassifier.from_timm(vit, num_classes)``) — the VTAB-1k / FGVC protocol: a
  frozen timm ViT, the prompts and a trainable linear head on the pre-logits features (VPT's head init:
  kaiming-normal weights, bias -log(99)), with the same training interface as the prompt learners.

``backend="reference"`` runs the official loop (the encoder's ``fast=False``); any other backend runs the fast
encoder (one concatenation, queries restricted to the rows that are kept, CLS-only last block).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastprompt._version import __version__
from fastprompt.encoders.prompted_vision import INSERT_MODES, PromptedVisionEncoder
from fastprompt.learners._common import LEARNER_BACKENDS, write_adapter
from fastprompt.learners._common import load_pretrained_tensors, read_pretrained
from fastprompt.learners.base import LearnerConfig, PromptLearner
from fastprompt.learners.registry import register_learner
from fastprompt.ops._dispatch import env_backend
from fastprompt.templates import format_prompts, template_for

__all__ = ["VPT", "VPTConfig", "VPTPrompts", "VPTClassifier", "vpt_init_bound"]


# VPT / VAPT solver (KMnP/vpt configs/base-prompt.yaml + src/solver, VAPT's copy of it): SGD momentum 0.9,
# weight decay 1e-4, 10 linear warm-up epochs then cosine (schedule "warmup_cosine"), 100 epochs, and the lr
# given as VPT's *grid* lr, trained at lr * batch / 256 (tune_vtab.py). lr and weight decay are grid-searched
# per task officially ({50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1, 0.05} x {0.01, 1e-3, 1e-4, 0}); no single
# value is official: 5.0 is the first of the grid, the lr VAPT's ``tune_vtab.py --fast`` trains with while it
# tunes the weight decay. Pass --lr / OPTIM.LR (SOLVER.BASE_LR) for a task's tuned value.
VPT_SOLVER: Dict[str, Any] = {"epochs": 100, "lr": 5.0, "weight_decay": 1e-4, "warmup_epoch": 10,
                              "lr_scheduler": "warmup_cosine", "lr_batch_scaling": True}

@dataclass
class VPTConfig(LearnerConfig):
    """Options named after VPT's ``MODEL.PROMPT.*`` keys, lower-cased (official defaults)."""

    num_tokens: int = 5
    deep: bool = False
    dropout: float = 0.0  # PROMPT.DROPOUT (the released VTAB settings use 0.1)
    insert: str = "after_cls"  # "append" puts them after the patches (IVLP-style)
    dataset: str = ""  # CLIP only: picks the class-text template (CoOp's CUSTOM_TEMPLATES)
    template: Optional[str] = None  # CLIP only: overrides the template
    head_special_bias: bool = True  # classifier only: VPT's head bias -log((1 - 0.01) / 0.01)

    def validate(self) -> None:
        super().validate()
        _check_common(self.num_tokens, self.dropout, self.insert)


def vpt_init_bound(patch_size, width: int) -> float:
    """VPT's uniform bound sqrt(6 / (3 * ph * pw + D)) (0.0625 for ViT-B/16)."""
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    return math.sqrt(6.0 / float(3 * ph * pw + width))


def _patch_size(encoder: PromptedVisionEncoder):
    v = encoder.visual
    return v.patch_size if encoder.kind == "open_clip" else v.patch_embed.patch_size


def _check_common(num_tokens: int, dropout: float, insert: str) -> None:
    if not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if insert not in INSERT_MODES:
        raise ValueError(f"insert must be one of {INSERT_MODES}, got {insert!r}")


class VPTPrompts(nn.Module):
    """VPT's prompt tensors; ``source(...)`` gives the encoder its ``{block: [B, N, D] | [N, D]}`` dict."""

    def __init__(self, encoder: PromptedVisionEncoder, num_tokens: int, deep: bool, dropout: float):
        super().__init__()
        D, L = encoder.width, encoder.depth
        bound = vpt_init_bound(_patch_size(encoder), D)
        dtype, device = encoder.dtype, next(encoder.visual.parameters()).device
        self.prompt_embeddings = nn.Parameter(torch.empty(1, num_tokens, D, dtype=dtype, device=device))
        nn.init.uniform_(self.prompt_embeddings, -bound, bound)
        self.deep = deep
        if deep:
            self.deep_prompt_embeddings = nn.Parameter(torch.empty(L - 1, num_tokens, D, dtype=dtype, device=device))
            nn.init.uniform_(self.deep_prompt_embeddings, -bound, bound)
        self.prompt_dropout = nn.Dropout(dropout)

    def _drop(self, p: torch.Tensor, B: int) -> torch.Tensor:
        if self.training and self.prompt_dropout.p > 0:  # one mask per sample, as the official expand-then-drop
            return self.prompt_dropout(p.expand(B, -1, -1))
        return p[0] if p.dim() == 3 else p

    def source(self, B: int, **_) -> Dict[int, torch.Tensor]:
        """{0: shallow prompts, i: deep prompts of block i} with dropout drawn in block order."""
        out = {0: self._drop(self.prompt_embeddings, B)}
        if self.deep:
            for i in range(self.deep_prompt_embeddings.shape[0]):
                out[i + 1] = self._drop(self.deep_prompt_embeddings[i : i + 1], B)
        return out


def _check_backend(value: str) -> str:
    value = str(value).lower()
    if value not in LEARNER_BACKENDS:
        raise ValueError(f"unknown backend {value!r}; choose one of {', '.join(LEARNER_BACKENDS)}")
    return value


def prompted_image_features(encoder: PromptedVisionEncoder, prompts: nn.Module, images: torch.Tensor,
                            backend: str) -> torch.Tensor:
    """[B, 3, H, W] -> [B, E] prompted features; ``backend`` "reference" = the official loop."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float [B, 3, H, W] tensor, got {getattr(images, 'shape', type(images))}")
    images = images.to(encoder.dtype)
    fast = backend != "reference"
    op_backend = "reference" if backend in ("torch", "reference") else backend
    source = prompts.source(images.shape[0], encoder=encoder, fast=fast, backend=op_backend)
    return encoder(images, source, fast=fast)


# ---------------------------------------------------------------------------------------------- CLIP learner
def clip_class_text(learner: PromptLearner) -> torch.Tensor:
    """[C, E] normalised frozen text features of the learner's template, computed once per class list."""
    w = learner.tower.token_embedding.weight
    key = (tuple(learner.classnames), learner.template, w.device, w.dtype)
    if getattr(learner, "_class_text_key", None) != key:
        feats = learner.frozen_text_features(format_prompts(learner.template, learner.classnames))
        learner._class_text, learner._class_text_key = F.normalize(feats, dim=-1), key
    return learner._class_text


class PromptedCLIP:
    """Mixin of the CLIP prompt learners of the visual-prompt family (VPT, VAPT): ``self.encoder``
    (PromptedVisionEncoder) + ``self.prompts`` against frozen class text."""

    @property
    def template(self) -> str:
        """The class-text template, ``config.template`` or the dataset's (CoOp's CUSTOM_TEMPLATES)."""
        return self.config.template or template_for(self.config.dataset or "")

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """The frozen class text is recomputed on next use (``clip_class_text``)."""
        self.classnames = [str(c) for c in classnames]
        if not self.classnames:
            raise ValueError("classnames is empty")

    def encode_prompted_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, E] unnormalised prompted image features."""
        return prompted_image_features(self.encoder, self.prompts, images, self.backend)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> logits [B, C] = logit_scale * cos(prompted image, frozen class text)."""
        text = clip_class_text(self)
        feats = F.normalize(self.encode_prompted_images(images), dim=-1)
        return self.logit_scale * feats.to(text.dtype) @ text.t()


@register_learner("vpt")
class VPT(PromptedCLIP, PromptLearner):
    """VPT on an open_clip CLIP. ``forward(images [B, 3, H, W]) -> logits [B, C]``; trainable tensors:
    ``prompts.prompt_embeddings`` [1, N, Dv] (and ``prompts.deep_prompt_embeddings`` [L-1, N, Dv] if deep)."""

    method = "vpt"
    config_class = VPTConfig
    training_defaults = dict(VPT_SOLVER, batch_size=128)  # KMnP/vpt configs/base-prompt.yaml
    tiny_setup = {"num_tokens": 2, "deep": True}

    def __init__(self, clip_model: nn.Module, classnames: Sequence[str], config=None, tokenizer=None, **kwargs):
        super().__init__(clip_model, classnames, config, tokenizer, **kwargs)
        config = self.config
        self.encoder = PromptedVisionEncoder(self.clip.visual, config.insert)
        self.prompts = VPTPrompts(self.encoder, config.num_tokens, config.deep, config.dropout)
        self.set_classnames(classnames)


# ---------------------------------------------------------------------------------------------- classifier
class VPTClassifier(nn.Module):
    """A frozen timm ViT + visual prompts + a trainable linear head (VTAB-1k / FGVC protocol).

    Build with :meth:`from_timm`. The prompts are a plug-in module (``self.prompts``, anything with
    ``source(B, encoder=, fast=, backend=)``), so VAPT reuses this class with its generator. Same training
    interface as :class:`~fastprompt.learners._common.PromptLearner`.
    """

    method = "vpt"
    config_class = VPTConfig

    def __init__(self, model: nn.Module, num_classes: int, prompts_factory, config):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        for p in model.parameters():
            p.requires_grad_(False)
        self.backbone = model.eval()
        self.config = config
        self.num_classes = num_classes
        self.encoder = PromptedVisionEncoder(model, config.insert)
        if self.encoder.kind != "timm":
            raise TypeError("from_timm needs a timm VisionTransformer; use create_learner() for an open_clip CLIP")
        self.prompts = prompts_factory(self.encoder)
        p = next(model.parameters())
        self.head = nn.Linear(self.encoder.width, num_classes, dtype=p.dtype, device=p.device)
        nn.init.kaiming_normal_(self.head.weight, a=0, mode="fan_out")
        if getattr(config, "head_special_bias", True):
            nn.init.constant_(self.head.bias, -math.log((1 - 0.01) / 0.01))
        else:
            nn.init.zeros_(self.head.bias)
        self._backend = "auto"
        self.backend = getattr(config, "backend", None) or env_backend()

    @classmethod
    def from_timm(cls, model: nn.Module, num_classes: int, config=None, **kwargs) -> "VPTClassifier":
        """VPT on a timm ``VisionTransformer`` (e.g. ``vit_base_patch16_224``), with a new linear head."""
        config = VPTConfig.build(config, kwargs)
        return cls(model, num_classes, lambda enc: VPTPrompts(enc, config.num_tokens, config.deep, config.dropout), config)

    # ------------------------------------------------------------------ backend
    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = _check_backend(value)

    @property
    def uses_reference(self) -> bool:
        return self._backend == "reference"

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # the backbone never leaves eval mode (no dropout / drop-path), as in VPT
        return self

    # ------------------------------------------------------------------ forward and training interface
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> logits [B, num_classes]."""
        return self.head(prompted_image_features(self.encoder, self.prompts, images, self._backend))

    # The rest of the training interface and the state methods are the prompt learners' own (they only use
    # forward and the trainable parameters), assigned rather than inherited: this is not a PromptLearner.
    loss = PromptLearner.loss  # softmax cross-entropy
    compute_loss = PromptLearner.compute_loss  # -> (loss [], logits [B, num_classes])
    def param_groups(self, lr: float):
        """Optimizer groups at base learning rate ``lr``: every trainable tensor at the optimizer's weight decay,
        except the head's bias, which VPT's (and VAPT's) ``make_optimizer`` keeps out of weight decay ("no
        regularization for last layer's bias"; its SGD branch, i.e. whenever WEIGHT_DECAY > 0)."""
        bias = self.head.bias
        rest = [p for p in self.parameters() if p.requires_grad and p is not bias]
        groups = [{"params": rest, "lr": lr}]
        if bias is not None and bias.requires_grad:
            groups.append({"params": [bias], "lr": lr, "weight_decay": 0.0})
        return groups

    on_epoch_end = PromptLearner.on_epoch_end  # nothing to do at epoch ends
    attach_train_data = PromptLearner.attach_train_data  # not used by VPT / VAPT

    # ------------------------------------------------------------------ state
    trainable_state_dict = PromptLearner.trainable_state_dict
    num_trainable_parameters = PromptLearner.num_trainable_parameters
    load_trainable_state_dict = PromptLearner.load_trainable_state_dict

    def save_pretrained(self, directory: str) -> None:
        """Write the trainable tensors (prompts + head, safetensors) and a JSON config to ``directory``."""
        arch = getattr(self.backbone, "pretrained_cfg", {}) or {}
        meta = {"method": self.method, "config": dataclasses.asdict(self.config), "num_classes": self.num_classes,
                "backbone": arch.get("architecture"), "fastprompt_version": __version__}
        write_adapter(directory, meta, self.trainable_state_dict())

    @classmethod
    def from_pretrained(cls, directory: str, model: nn.Module, **overrides) -> "VPTClassifier":
        """Rebuild from :meth:`save_pretrained` on the same timm backbone ``model``."""
        meta = read_pretrained(directory)
        if meta.get("method") != cls.method:
            raise ValueError(f"{directory} holds a {meta.get('method')!r} classifier, not {cls.method!r}")
        config = dict(meta["config"])
        config.update(overrides)
        clf = cls.from_timm(model, int(meta["num_classes"]), config=config)
        clf.load_trainable_state_dict(load_pretrained_tensors(directory))
        return clf
