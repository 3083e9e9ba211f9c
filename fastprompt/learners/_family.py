"""Shared pieces of the CoOp family: the plug-in protocol (:class:`PluginBase`), the unified-context text path,
logits, and the mixins (:class:`CosineClassifier`, :class:`UnifiedContext`, :class:`Plugin`).

Plug-in protocol
----------------
DePT and CaPT are plug-ins: they hold a *base learner* (``self.base``) and add their parts around it. A base
learner (any learner implementing :class:`PluginBase`: coop, cocoop, kgcoop, prograd, maple, promptsrc, ...;
and DePT itself, so that CaPT can wrap it) provides:

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
``accepts_class_shift: bool`` (class attribute)
    Whether ``class_text_features`` takes a ``class_shift`` (CaPT needs it).
"""
from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, Dict, Optional, Protocol, Sequence, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastprompt.classplan import build_class_plan, clean_classnames
from fastprompt.encoders.prompted_text import PromptedTextEncoder
from fastprompt.learners._common import plan_kwargs
from fastprompt.learners.base import PromptLearner
from fastprompt.learners.registry import create_learner, get_learner_class
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


# ---------------------------------------------------------------------- shared behaviour as mixins
# A learner lists the mixins it shares before PromptLearner (``class KgCoOp(UnifiedContext, PromptLearner)``); a
# method the learner defines itself wins over the mixin's.
class CosineClassifier:
    """The protocol and learner methods of a learner that classifies by ``logit_scale * cos``."""

    def logits_from_features(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v [B, E], t [C, E] (unnormalised) -> [B, C] = logit_scale * cos."""
        return itm_logits(self.logit_scale, v, t)

    def loss_from_features(self, v, t, labels, itm_loss=None, params=None):
        """Trained on its logits only: ``itm_loss(logits, labels)`` (cross-entropy by default) ->
        (loss [], logits [B, C])."""
        logits = self.logits_from_features(v, t)
        return (itm_loss or F.cross_entropy)(logits, labels), logits

    def encode_text(self) -> torch.Tensor:
        """[C, E] L2-normalised ``class_text_features()`` (text that does not depend on the image; cached in eval
        mode under no_grad)."""
        return self.cached_text_features(lambda: F.normalize(self.class_text_features(), dim=-1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> logits [B, C] = logit_scale * cos(image_features, encode_text())."""
        return self.logits_from_image_features(self.image_features(images))

    def logits_from_image_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """[B, E] as ``image_features(images)`` returns them -> logits [B, C], the rest of :meth:`forward` (the
        feature store's entry point for frozen image towers)."""
        image_features = F.normalize(image_features, dim=-1)
        text_features = self.encode_text()
        return self.logit_scale * image_features.to(text_features.dtype) @ text_features.t()


class UnifiedContext(CosineClassifier):
    """A unified-context "end"-position learner (``self.text``, ``self.ctx`` [M, D]; KgCoOp, ProGrad): frozen
    image tower, one shared context, and its loss through the protocol."""

    accepts_class_shift = True

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> [B, E] unnormalised frozen image features."""
        return self.encode_images(images)

    def class_text_features(self, image_features=None, class_shift: Optional[torch.Tensor] = None) -> torch.Tensor:
        """-> [C, E] unnormalised learned-prompt features. ``image_features`` is unused (not image-conditional);
        ``class_shift`` [C, D] is added to each class's context."""
        check_shift(class_shift, len(self.classnames), self.tower.width)
        if self.uses_reference:
            return unified_reference_text(self.text, self.ctx, class_shift)
        return unified_fast_text(self.text, self.ctx, class_shift, self.op_backend)

    def compute_loss(self, images: torch.Tensor, labels: torch.Tensor):
        """images [B, 3, H, W], labels [B] -> ``loss_from_features(image_features(images),
        class_text_features(v), labels)`` = (loss [], logits [B, C])."""
        v = self.image_features(images)
        return self.loss_from_features(v, self.class_text_features(v), labels)


@runtime_checkable
class PluginBase(Protocol):
    """What a plug-in (DePT, CaPT) needs of its base learner (see the module docstring)."""

    image_conditional: bool

    def image_features(self, images: torch.Tensor) -> torch.Tensor: ...

    def class_text_features(self, image_features=None, class_shift=None) -> torch.Tensor: ...

    def logits_from_features(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def loss_from_features(self, v, t, labels, itm_loss=None, params=None): ...

    def set_classnames(self, classnames: Sequence[str]) -> None: ...


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


class Plugin:
    """A learner that holds a base learner (``self.base``) and adds its parts around it (DePT, CaPT).

    The trainer hooks go to the base (PromptSRC's prompt aggregation, DAPT's prototypes and their resume state
    live there), and one backend is shared by both. A subclass says what it needs of a base in
    :meth:`base_unsupported`.
    """

    backend = forwarding_backend()

    @classmethod
    def base_unsupported(cls, base_class: type) -> Optional[str]:
        """Why ``base_class`` cannot be this plug-in's base, or None (checked before the base is built)."""
        return None

    def build_base(self, name: str, clip_model: nn.Module, classnames: Sequence[str], base_config: Dict[str, Any]):
        """Create the base learner ``name`` and check it declares what this plug-in needs (the
        :class:`PluginBase` hooks, and :meth:`base_unsupported`)."""
        owner = type(self).__name__
        why = self.base_unsupported(get_learner_class(name))
        if why:
            raise ValueError(f"{owner} does not support base learner {name!r}: {why}")
        base = create_learner(name, clip_model, classnames, config=dict(base_config), tokenizer=self.tokenizer)
        if not isinstance(base, PluginBase):
            missing = [m for m in PROTOCOL if not hasattr(base, m)]
            raise ValueError(f"{owner} does not support base learner {name!r}: it lacks the plug-in hooks {missing}")
        return base

    def on_epoch_end(self, epoch: int, max_epoch: int) -> None:
        """The base's hook (it may change the prompts, so the text cache is dropped)."""
        self.base.on_epoch_end(epoch, max_epoch)
        self._text_cache = None

    def attach_train_data(self, dataset, **kwargs) -> None:
        self.base.attach_train_data(dataset, **kwargs)

    def training_state_dict(self):
        """The base's resume state, or None when it keeps none."""
        getter = getattr(self.base, "training_state_dict", None)
        return getter() if callable(getter) else None

    def load_training_state_dict(self, state) -> None:
        """Restores the base's resume state (ignored when the base keeps none)."""
        loader = getattr(self.base, "load_training_state_dict", None)
        if callable(loader) and state is not None:
            loader(state)

    @property
    def training_state_includes_train_data(self) -> bool:
        """The base's (DAPT's prototypes come back from the checkpoint, so a resumed CaPT-over-DAPT run must not
        rebuild them from the images either)."""
        return bool(getattr(self.base, "training_state_includes_train_data", False))


def with_dataset(base_name: str, base_config: Dict[str, Any], dataset: str) -> Dict[str, Any]:
    """Pass a plug-in's ``dataset`` option down to its base (and the base's base) when they take one and it
    was not given explicitly."""
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
    return {k: v for k, v in asdict(learner.config).items() if k != "backend"}
