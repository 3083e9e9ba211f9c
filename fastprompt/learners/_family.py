"""Shared pieces of the CoOp family: the plug-in protocol, the unified-context text path, logits.

Plug-in protocol
----------------
DePT and CaPT are plug-ins: they hold a *base learner* (``self.base``) and add their parts around it. A base
learner (coop, cocoop, kgcoop, prograd; later maple, promptsrc; and DePT itself, so that CaPT can wrap it)
provides:

``image_conditional: bool``
    True when the class text features depend on the image (CoCoOp): they are then [B, C, E] and never cached.
``image_features(images [B, 3, H, W]) -> v [B, E]``
    Unnormalised image features (frozen for CoOp-like methods; prompted for MaPLe-like ones).
``class_text_features(v=None, class_shift=None) -> t [C, E] | [B, C, E]``
    Unnormalised class text features through the learner's backend (reference 77-token path or the fast engine).
    ``v`` is the batch's unnormalised image features (only conditional learners read it). ``class_shift`` [C, D]
    (CaPT) is added to every context token of class c's prompt; a learner that cannot take it raises ValueError.
``logits_from_features(v, t) -> [B, C]``
    The learner's prediction (CoOp: ``logit_scale * cos``; DePT: the fused ITM/CAT logits on its base task).
``loss_from_features(v, t, labels, itm_loss=None, params=None) -> (loss [], logits [B, C])``
    The training objective. ``itm_loss(logits, labels)`` replaces the plain cross-entropy on the ITM logits (CaPT
    passes its margin-ITM loss, DePT folds its CAT term into it); the method's other terms (KgCoOp's knowledge
    guidance, ProGrad's projection) are kept. ``params`` lists every tensor being trained (a wrapper's too):
    ProGrad projects the gradients of all of them, as the official code projects every prompt-learner tensor.
``set_classnames(names)``, ``classnames``, ``param_groups(lr)``, ``backend``
    As for every learner.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastprompt.classplan import build_class_plan, clean_classnames
from fastprompt.encoders.prompted_text import PromptedTextEncoder
from fastprompt.learners._common import PromptLearner, plan_kwargs
from fastprompt.templates import format_prompts

PROTOCOL = ("image_features", "class_text_features", "logits_from_features", "loss_from_features", "set_classnames")


def itm_logits(logit_scale: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``logit_scale * cos``: v [B, E] unnormalised, t [C, E] or [B, C, E] unnormalised -> [B, C]."""
    v = F.normalize(v, dim=-1).to(t.dtype)
    t = F.normalize(t, dim=-1)
    if t.dim() == 2:
        return logit_scale * v @ t.t()
    return logit_scale * torch.einsum("be,bce->bc", v, t)


def check_shift(shift: Optional[torch.Tensor], n_cls: int, width: int) -> None:
    if shift is None:
        return
    if not isinstance(shift, torch.Tensor) or shift.shape != (n_cls, width):
        got = tuple(shift.shape) if isinstance(shift, torch.Tensor) else type(shift).__name__
        raise ValueError(f"class_shift must be a [{n_cls}, {width}] tensor (one shift per class), got {got}")


def unified_reference_text(text: PromptedTextEncoder, ctx: torch.Tensor, shift: Optional[torch.Tensor]) -> torch.Tensor:
    """Official "end"-position prompts of one shared context ``ctx`` [M, D] (+ a per-class shift [C, D]) built by
    concatenation to full length and run through the 77-token tower -> unnormalised [C, E]."""
    C, M = text.plan.num_classes, ctx.shape[0]
    ctx = ctx.unsqueeze(0).expand(C, -1, -1)
    if shift is not None:
        ctx = ctx + shift.unsqueeze(1)  # CaPT: the same class offset on every context token
    prompts = torch.cat([text.token_embeds[:, :1], ctx, text.token_embeds[:, 1 + M :]], dim=1)
    return text.reference_features(prompts, text.token_ids)


def unified_fast_text(
    text: PromptedTextEncoder, ctx: torch.Tensor, shift: Optional[torch.Tensor], backend: str
) -> torch.Tensor:
    """The same features through the fast engine -> unnormalised [C, E].

    Without a shift every class shares one prefix (G = 1). With a per-class shift each class has its own
    context, so the engine runs the diagonal pairs (c, c) over C packed, truncated prompts; the assemble op adds
    the shift to the context rows (and sums its gradient back into ``ctx`` and ``shift``).
    """
    if shift is None:
        return text.fast_pairs(ctx.unsqueeze(0), None, "shared", backend=backend, normalize=False)
    C = text.plan.num_classes
    return text.fast_pairs(ctx.unsqueeze(0).expand(C, -1, -1), shift, "diagonal", backend=backend, normalize=False)


def rebuild_unified_prompts(learner, classnames: Sequence[str], template: str) -> torch.Tensor:
    """Switch a unified-context "end"-position learner (KgCoOp, ProGrad) to ``classnames``.

    Sets ``learner.classnames`` (cleaned) and ``learner.text`` (the PromptedTextEncoder of
    ``"<learner.prompt_prefix> <name>."`` with ``learner.n_ctx`` context tokens), clears the text cache, and
    returns the L2-normalised frozen CLIP features [C, E] of ``template`` filled with each class name (on the
    device of ``learner.ctx``), for the caller to keep as its buffer.
    """
    names = clean_classnames(classnames)
    plan = build_class_plan(
        names, learner.tokenizer, learner.n_ctx, learner.prompt_prefix, "end", **plan_kwargs(learner.tower)
    )
    learner.classnames = names
    learner.text = PromptedTextEncoder(learner.clip, plan).to(learner.ctx.device)
    learner._text_cache = None
    w = learner.frozen_text_features(format_prompts(template, names))
    return F.normalize(w, dim=-1).to(learner.ctx.device)


def unified_class_text_features(
    self, image_features=None, class_shift: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Plug-in hook of a unified-context learner (``self.text``, ``self.ctx`` [M, D]; KgCoOp, ProGrad), assigned
    as its ``class_text_features`` method -> [C, E] unnormalised learned-prompt features. ``image_features`` is
    unused (not image-conditional); ``class_shift`` [C, D] is added to each class's context."""
    check_shift(class_shift, len(self.classnames), self.tower.width)
    if self.uses_reference:
        return unified_reference_text(self.text, self.ctx, class_shift)
    return unified_fast_text(self.text, self.ctx, class_shift, self.op_backend)


# ---------------------------------------------------------------------- methods shared as class attributes
# Learners assign these plain functions as methods (``forward = cosine_forward``): one definition of the
# common protocol methods, without a second base class (PromptLearner stays the only base).
def frozen_image_features(self, images: torch.Tensor) -> torch.Tensor:
    """``image_features`` of a learner with a frozen image tower: images [B, 3, H, W] -> [B, E] unnormalised."""
    return self.encode_images(images)


def itm_logits_from_features(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``logits_from_features``: v [B, E], t [C, E] (unnormalised) -> [B, C] = logit_scale * cos."""
    return itm_logits(self.logit_scale, v, t)


def ce_loss_from_features(self, v, t, labels, itm_loss=None, params=None):
    """``loss_from_features`` of a learner trained on its logits only: ``itm_loss(logits, labels)``
    (cross-entropy by default) -> (loss [], logits [B, C])."""
    logits = self.logits_from_features(v, t)
    return (itm_loss or F.cross_entropy)(logits, labels), logits


def normalized_class_text(self) -> torch.Tensor:
    """``encode_text`` of a learner whose text does not depend on the image: [C, E] L2-normalised
    ``class_text_features()`` (cached in eval mode under no_grad)."""
    return self.cached_text_features(lambda: F.normalize(self.class_text_features(), dim=-1))


def cosine_forward(self, images: torch.Tensor) -> torch.Tensor:
    """``forward``: images [B, 3, H, W] -> logits [B, C] = logit_scale * cos(image_features, encode_text())."""
    return cosine_logits_from_image_features(self, self.image_features(images))


def cosine_logits_from_image_features(self, image_features: torch.Tensor) -> torch.Tensor:
    """``logits_from_image_features``: [B, E] as ``image_features(images)`` returns them -> logits [B, C], the
    rest of :func:`cosine_forward` (the feature store's entry point for frozen image towers)."""
    image_features = F.normalize(image_features, dim=-1)
    text_features = self.encode_text()
    return self.logit_scale * image_features.to(text_features.dtype) @ text_features.t()


def features_compute_loss(self, images: torch.Tensor, labels: torch.Tensor):
    """``compute_loss`` through the protocol: images [B, 3, H, W], labels [B] ->
    ``loss_from_features(image_features(images), class_text_features(v), labels)`` = (loss [], logits [B, C])."""
    v = self.image_features(images)
    return self.loss_from_features(v, self.class_text_features(v), labels)


# Trainer hooks of a plug-in (DePT, CaPT), forwarded to its base learner ``self.base``: PromptSRC's prompt
# aggregation, DAPT's prototypes and their resume state live in the base. Assigned as class attributes.
def forward_on_epoch_end(self, epoch: int, max_epoch: int) -> None:
    """``on_epoch_end``: the base's hook (it may change the prompts, so the text cache is dropped)."""
    self.base.on_epoch_end(epoch, max_epoch)
    self._text_cache = None


def forward_attach_train_data(self, dataset, **kwargs) -> None:
    """``attach_train_data``: handed to the base learner."""
    self.base.attach_train_data(dataset, **kwargs)


def forward_training_state_dict(self):
    """``training_state_dict``: the base's resume state, or None when it keeps none."""
    getter = getattr(self.base, "training_state_dict", None)
    return getter() if callable(getter) else None


def forward_load_training_state_dict(self, state) -> None:
    """``load_training_state_dict``: restores the base's resume state (ignored when the base keeps none)."""
    loader = getattr(self.base, "load_training_state_dict", None)
    if callable(loader) and state is not None:
        loader(state)


def _base_state_includes_train_data(self) -> bool:
    return bool(getattr(self.base, "training_state_includes_train_data", False))


# ``training_state_includes_train_data`` of a plug-in: its base's (DAPT's prototypes come back from the checkpoint,
# so a resumed CaPT-over-DAPT run must not rebuild them from the images either).
forward_includes_train_data = property(_base_state_includes_train_data)


def forwarding_backend(child: str = "base", clear: Sequence[str] = (), follow_child: bool = True) -> property:
    """A ``backend`` property for learners that wrap another learner (submodule ``child``: a plug-in's ``base``,
    DPC's ``backbone``, PromptKD's ``teacher``): setting it sets the child's backend too and drops the caches
    named in ``clear`` (they were computed under the old backend).

    ``follow_child``: when the child falls back (a tower the fast engine cannot run makes its "auto" the
    reference), take its backend too; right when both run the same tower, not for a teacher on another CLIP.
    """

    def fget(self) -> str:
        return PromptLearner.backend.fget(self)

    def fset(self, value: str) -> None:
        PromptLearner.backend.fset(self, value)
        wrapped = self._modules.get(child)
        if wrapped is not None:
            wrapped.backend = value
            if follow_child:
                PromptLearner.backend.fset(self, wrapped.backend)
        for name in clear:
            setattr(self, name, None)

    return property(fget, fset, doc=f"Learner backend, shared with the wrapped {child} learner.")


def build_base(
    owner: str,
    name: str,
    clip_model: nn.Module,
    classnames: Sequence[str],
    base_config: Dict[str, Any],
    tokenizer,
    allowed: Sequence[str],
):
    """Create the base learner of a plug-in and check it speaks the protocol above."""
    from fastprompt.learners.registry import create_learner

    if name not in allowed:
        raise ValueError(f"{owner} does not support base learner {name!r}; choose one of {', '.join(allowed)}")
    base = create_learner(name, clip_model, classnames, config=dict(base_config), tokenizer=tokenizer)
    missing = [m for m in PROTOCOL if not hasattr(base, m)]
    if missing:
        raise TypeError(f"{owner}: base learner {name!r} lacks the plug-in hooks {missing}")
    return base


def with_dataset(base_name: str, base_config: Dict[str, Any], dataset: str) -> Dict[str, Any]:
    """Pass a plug-in's ``dataset`` option down to its base (and the base's base) when they take one and it
    was not given explicitly."""
    from dataclasses import fields

    from fastprompt.learners.registry import get_learner_class

    cfg = dict(base_config)
    names = {f.name for f in fields(get_learner_class(base_name).config_class)}
    if "dataset" in names and "dataset" not in cfg:
        cfg["dataset"] = dataset
    if "base_config" in names:
        inner_name = cfg.get("base") or getattr(get_learner_class(base_name).config_class(), "base", None)
        if inner_name:
            cfg["base_config"] = with_dataset(inner_name, cfg.get("base_config") or {}, dataset)
    return cfg


def resolved_config(learner) -> Dict[str, Any]:
    """A learner's options as a plain dict, without ``backend`` (a plug-in sets one backend for all)."""
    from dataclasses import asdict

    return {k: v for k, v in asdict(learner.config).items() if k != "backend"}
