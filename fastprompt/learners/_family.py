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

from fastprompt.encoders.prompted_text import PromptedTextEncoder
from fastprompt.learners._common import PromptLearner

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
    C = text.plan.num_classes
    c_idx = torch.arange(C, device=ctx.device)
    if shift is None:
        g_idx = torch.zeros(C, dtype=torch.long, device=ctx.device)
        return text.fast_features(ctx.unsqueeze(0), None, g_idx, c_idx, backend=backend, normalize=False)
    return text.fast_features(ctx.unsqueeze(0).expand(C, -1, -1), shift, c_idx, c_idx, backend=backend, normalize=False)


def forwarding_backend() -> property:
    """A ``backend`` property for plug-ins: setting it sets the wrapped base learner's backend too."""

    def fget(self) -> str:
        return PromptLearner.backend.fget(self)

    def fset(self, value: str) -> None:
        PromptLearner.backend.fset(self, value)
        base = self._modules.get("base")
        if base is not None:
            base.backend = value
            # A tower the fast engine cannot run makes "auto" fall back to the reference: keep both in step.
            PromptLearner.backend.fset(self, base.backend)

    return property(fget, fset, doc="Learner backend, shared with the wrapped base learner.")


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
