"""DePT (Zhang et al., CVPR'24): decoupled prompt tuning, as a plug-in over a base learner.

DePT holds a base learner (coop, cocoop, kgcoop; any learner with the plug-in hooks of ``_family.py``) and adds
a CAT head beside the base's ITM head (cosine x logit scale):

* two channel-wise transforms ``x -> scale * x + bias`` (FiLM, scale = 1, bias = 0 at init) on the
  *unnormalised* text features t and image features v;
* a linear classifier over the base classes (``nn.Linear(E, C_base)``, PyTorch default init).

Training (on the classes the head was built for)::

    loss = (1 - lam) * CE(ITM logits, y) + lam * CE(head([film_t(t)[y]; film_v(v)]), [y; y]) + base extra terms

the text feature of each sample's ground-truth class is an extra training row for the head (CoCoOp: the text
feature of image i's own prompts). KgCoOp + DePT keeps KgCoOp's W * (1 - mean cos) term (W = 2 in DePT's repo).
Evaluation: on the head's classes the logits are fused, ``(1 - lam) * ITM + lam * head(film_v(v))`` (raw logits,
as the code does; the paper writes probabilities); on other classes (``set_classnames(new)``) only the ITM head.
``param_groups(lr)`` puts the head and FiLM at ``lr * head_lr_mult`` (6.5; DeCaPT: 18), the prompt at ``lr``.

Deliberate differences: the FiLM parameters are kept in the model dtype (the official code keeps them in fp32
and casts them to the feature dtype: the same thing for fp32 models; for fp16 models we keep fp32 too).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastprompt.classplan import clean_classnames
from fastprompt.learners._family import PROTOCOL, Plugin, resolved_config
from fastprompt.learners.base import LearnerConfig, PromptLearner
from fastprompt.learners.registry import register_learner

# DePT's per-baseline settings (DePT's configs/trainers/*; ``docs/methods/dept.md``): KgCoOp runs with W = 2.0 there.
BASE_DEFAULTS: Dict[str, Dict[str, Any]] = {"coop": {}, "cocoop": {}, "kgcoop": {"w": 2.0}, "prograd": {}}


@dataclass
class DePTConfig(LearnerConfig):
    """Official DePT defaults (``LINEAR_PROBE.WEIGHT=0.7``, ``LR_EXP=6.5``, ``TEST_TIME_FUSION=True``)."""

    base: str = "coop"  # the base learner's registered name
    base_config: Dict[str, Any] = field(default_factory=dict)  # its options (over DePT's per-base defaults)
    cls_weight: float = 0.7  # lambda: weight of the CAT head in the loss and in the fused logits
    head_lr_mult: float = 6.5  # learning-rate multiplier of the CAT head and FiLM (DeCaPT: 18)
    test_time_fusion: bool = True  # False: the head's logits alone on its classes
    head_classnames: Optional[List[str]] = None  # classes of the linear head (default: the classes at build)

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.cls_weight <= 1.0:
            raise ValueError(f"cls_weight must be in [0, 1], got {self.cls_weight}")
        if self.head_lr_mult <= 0:
            raise ValueError(f"head_lr_mult must be > 0, got {self.head_lr_mult}")
        if not isinstance(self.base_config, dict):
            raise TypeError(f"base_config must be a dict of the base learner's options, got {type(self.base_config).__name__}")


class FiLM(nn.Module):
    """Channel-wise transform ``x [.., E] -> scale * x + bias`` (scale [E] = 1, bias [E] = 0 at init)."""

    def __init__(self, dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale.to(x.dtype) * x + self.bias.to(x.dtype)


@register_learner("dept")
class DePT(Plugin, PromptLearner):
    """DePT over ``config.base``. ``forward(images) -> logits [B, C]``; ``compute_loss`` is the DePT objective.

    Trainable: the base's tensors (``base.*``), ``film_text.{scale,bias}`` [E], ``film_img.{scale,bias}`` [E],
    ``head.weight`` [C_base, E], ``head.bias`` [C_base].
    """

    config_class = DePTConfig
    training_defaults = {"epochs": 10, "batch_size": 4, "lr": 0.0035}
    tiny_setup = {"base_config": {"n_ctx": 2}}

    accepts_class_shift = True  # handed to its base (CaPT over DePT)

    @classmethod
    def base_unsupported(cls, base_class: type):
        """Any learner with the plug-in hooks, except a plug-in (DePT's head goes on a prompt learner)."""
        missing = [m for m in PROTOCOL + ("image_conditional",) if not hasattr(base_class, m)]
        if missing:
            return f"it lacks the plug-in hooks {missing}"
        if issubclass(base_class, Plugin):
            return "it is a plug-in itself"
        return None

    def __init__(self, clip_model: nn.Module, classnames: Sequence[str], config=None, tokenizer=None, **kwargs):
        config = DePTConfig.build(config, kwargs)
        names = clean_classnames(classnames)
        head_names = clean_classnames(config.head_classnames) if config.head_classnames is not None else names
        config = replace(config, head_classnames=list(head_names))  # saved, so a reload rebuilds the same head
        super().__init__(clip_model, names, config, tokenizer)
        base_cfg = {**BASE_DEFAULTS.get(config.base, {}), **config.base_config}
        base_cfg["backend"] = config.backend  # one backend for the whole learner
        self.base = self.build_base(config.base, clip_model, names, base_cfg)
        self.backend = self.base.backend
        # Record the base's resolved options (e.g. DePT's head classes), so a reload rebuilds the same base.
        self.config = replace(self.config, base_config=resolved_config(self.base))
        dim = int(self.clip.visual.output_dim)
        device = self.tower.token_embedding.weight.device
        film_dtype = torch.float32 if self.dtype in (torch.float16, torch.bfloat16) else self.dtype
        self.film_text = FiLM(dim, film_dtype, device)
        self.film_img = FiLM(dim, film_dtype, device)
        self.head = nn.Linear(dim, len(head_names)).to(device=device, dtype=self.dtype)
        self.head_classnames = list(head_names)
        self.set_classnames(names)

    # ------------------------------------------------------------------ classes
    def set_classnames(self, classnames: Sequence[str], use_head: Optional[bool] = None) -> None:
        """Switch the class list. The CAT head is used (fused) when the classes are the head's own; on other
        (new) classes only the ITM head, as DePT's "new" path. ``use_head=True`` with a subset of the head's
        classes slices the head's rows to them (DePT's ImageNet-A/-R handling)."""
        names = clean_classnames(classnames)
        if names != list(self.base.classnames):
            self.base.set_classnames(names)
        self.classnames = list(self.base.classnames)
        self._head_rows = None
        if use_head is None:
            use_head = self.classnames == self.head_classnames
        if use_head:
            index = {n: i for i, n in enumerate(self.head_classnames)}
            missing = [n for n in self.classnames if n not in index]
            if missing:
                raise ValueError(f"use_head=True needs classes the head was trained on; unknown: {missing[:5]}")
            rows = [index[n] for n in self.classnames]
            if rows != list(range(len(self.head_classnames))):
                self._head_rows = torch.tensor(rows, device=self.head.weight.device)
        self.use_head = bool(use_head)
        self._text_cache = None

    # ------------------------------------------------------------------ plug-in protocol (see _family.py)
    @property
    def image_conditional(self) -> bool:
        return self.base.image_conditional

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.base.image_features(images)

    def class_text_features(self, image_features=None, class_shift: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.base.class_text_features(image_features, class_shift)

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """[N, E] transformed features -> [N, C] CAT logits over the current classes."""
        w, b = self.head.weight, self.head.bias
        if self._head_rows is not None:
            w, b = w.index_select(0, self._head_rows), b.index_select(0, self._head_rows)
        return F.linear(features.to(w.dtype), w, b)

    def logits_from_features(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v [B, E], t [C, E] | [B, C, E] -> [B, C]: fused ITM/CAT logits on the head's classes, else ITM."""
        itm = self.base.logits_from_features(v, t)
        if not self.use_head:
            return itm
        cat = self.head_logits(self.film_img(v))
        if not self.config.test_time_fusion:
            return cat
        lam = self.config.cls_weight
        return (1 - lam) * itm + lam * cat.to(itm.dtype)

    def loss_from_features(self, v, t, labels, itm_loss=None, params=None):
        """DePT's objective: the base's objective with its ITM loss replaced by
        ``(1 - lam) * itm_loss(ITM logits, y) + lam * CE(CAT logits of [film_t(t)[y]; film_v(v)], [y; y])``."""
        if not self.use_head:
            raise ValueError(
                "DePT trains its CAT head on the classes it was built for; call set_classnames(head classes) first"
            )
        B = labels.shape[0]
        t_rows = t[labels] if t.dim() == 2 else t[torch.arange(B, device=t.device), labels]
        feats = torch.cat([self.film_text(t_rows), self.film_img(v).to(t_rows.dtype)])
        cat_loss = F.cross_entropy(self.head_logits(feats), torch.cat([labels, labels]))
        lam, inner = self.config.cls_weight, itm_loss or F.cross_entropy

        def dept_itm_loss(logits, y):
            return (1 - lam) * inner(logits, y) + lam * cat_loss

        params = [p for p in self.parameters() if p.requires_grad] if params is None else params
        loss, _ = self.base.loss_from_features(v, t, labels, itm_loss=dept_itm_loss, params=params)
        with torch.no_grad():
            logits = self.logits_from_features(v.detach(), t.detach())
        return loss, logits

    # ------------------------------------------------------------------ learner interface
    def text_features(self, image_features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Unnormalised class text features (cached in eval mode when they do not depend on the image)."""
        if self.image_conditional:
            return self.class_text_features(image_features)
        return self.cached_text_features(lambda: self.class_text_features(None))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> logits [B, C] (fused on the head's classes, ITM only on others)."""
        return self.logits_from_image_features(self.image_features(images))

    def logits_from_image_features(self, v: torch.Tensor) -> torch.Tensor:
        """[B, E] as ``image_features(images)`` returns them -> logits [B, C] (the rest of ``forward``)."""
        return self.logits_from_features(v, self.text_features(v))

    @property
    def image_features_frozen(self) -> bool:
        """The base's: True when its image tower is the frozen, unprompted CLIP encoder (feature store)."""
        return bool(getattr(self.base, "image_features_frozen", False))

    def compute_loss(self, images: torch.Tensor, labels: torch.Tensor):
        """images [B, 3, H, W], labels [B] -> (DePT loss [], fused logits [B, C])."""
        v = self.image_features(images)
        return self.loss_from_features(v, self.class_text_features(v), labels)

    def param_groups(self, lr: float):
        """The base's groups at ``lr``; the CAT head and FiLM at ``lr * head_lr_mult`` (DePT's staged LR)."""
        new = [p for m in (self.film_text, self.film_img, self.head) for p in m.parameters() if p.requires_grad]
        return self.base.param_groups(lr) + [{"params": new, "lr": lr * self.config.head_lr_mult}]
