"""DPC's backbone hooks: how the parallel prompt P' drives each kind of tuned backbone (fastprompt/learners/dpc.py).

Each hook object exposes ``image_features(images, prompts) -> [B', E]`` and ``text_features(prompts, class_idx,
reference, op_backend) -> [C or n, E]`` (L2-normalised), with the DPC prompt tensors substituted into the frozen
backbone through ``torch.func.functional_call`` so that autograd reaches them and the backbone's own tensors are
untouched; ``image_uses_prompts`` says whether the image side depends on them (CoOp: no, so DPC reuses the
scoring image features). A PromptKD backbone also has ``score_features`` (the sampler's features) and ``logits``.
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastprompt.learners._common import PromptLearner
from fastprompt.learners.coop import CoOp
from fastprompt.learners.promptkd import PromptKD


class _Call(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.m = module

    def forward(self, fn, *args):
        return fn(*args)


def with_tensors(module: nn.Module, tensors: Dict[str, torch.Tensor], fn: Callable, *args):
    """Call ``fn(*args)`` (a method of ``module``) with ``module``'s named tensors replaced (autograd flows
    into the given tensors); the module's own parameters are untouched afterwards."""
    from torch.func import functional_call

    return functional_call(_Call(module), {f"m.{k}": v for k, v in tensors.items()}, (fn,) + args, strict=False)


class _CoOpHooks:
    """CoOp as a DPC backbone: frozen image tower; class features through the engine for any class subset."""

    image_uses_prompts = False

    def __init__(self, backbone: CoOp):
        self.bb = backbone

    def image_features(self, images, prompts):
        return F.normalize(self.bb.encode_images(images), dim=-1)

    def text_features(self, prompts, class_idx, reference: bool, op_backend: str):
        bb, ctx = self.bb, prompts["ctx"]
        if reference:  # the official path: every class at full length, then gather
            feats = F.normalize(with_tensors(bb, {"ctx": ctx}, bb._reference_text), dim=-1)
            return feats if class_idx is None else feats[class_idx]
        C = len(bb.classnames)
        idx = torch.arange(C, device=ctx.device) if class_idx is None else class_idx.to(ctx.device)
        n = idx.shape[0]
        if bb.csc:  # one context per class: the needed contexts only, diagonal pairs
            return bb.text.fast_features(ctx[idx], None, torch.arange(n, device=ctx.device), idx,
                                         backend=op_backend, normalize=True)
        g_idx = torch.zeros(n, dtype=torch.long, device=ctx.device)
        return bb.text.fast_features(ctx.unsqueeze(0), None, g_idx, idx, backend=op_backend, normalize=True)


class _GenericHooks:
    """A backbone with ``image_features(images)`` / ``text_features(class_idx=None)`` (MaPLe, PromptSRC)."""

    def __init__(self, backbone: PromptLearner):
        for name in ("image_features", "text_features"):
            if not callable(getattr(backbone, name, None)):
                raise TypeError(
                    f"DPC needs a backbone with image_features(images) and text_features(); "
                    f"{type(backbone).__name__} has no {name}"
                )
        self.bb = backbone
        self.image_uses_prompts = bool(getattr(backbone, "image_features_use_prompts", True))
        self.takes_class_idx = "class_idx" in inspect.signature(backbone.text_features).parameters

    def _call(self, prompts, fn, *args):
        self.bb._text_cache = None  # its cache key does not see substituted tensors: never reuse it
        try:
            return with_tensors(self.bb, prompts, fn, *args)
        finally:
            self.bb._text_cache = None

    def image_features(self, images, prompts):
        return F.normalize(self._call(prompts, self.bb.image_features, images), dim=-1)

    def text_features(self, prompts, class_idx, reference: bool, op_backend: str):
        if class_idx is not None and self.takes_class_idx and not reference:
            feats = self._call(prompts, lambda: self.bb.text_features(class_idx=class_idx))
            return F.normalize(feats, dim=-1)
        feats = F.normalize(self._call(prompts, self.bb.text_features), dim=-1)
        return feats if class_idx is None else feats[class_idx]


class PromptKDHooks:
    """PromptKD (+DPC, ``sple_promptkd.py``) as a DPC backbone.

    DPC prompts: the student's trainable tensors (``vpt``, ``vpt_deep.*``, ``projector.*``) and the frozen
    PromptSRC teacher's *text* prompts (``teacher.prompts.ctx``, ``teacher.prompts.text_deep.*``): the DPC model
    classifies with the teacher's text tower driven by P' (frozen inside PromptKD, so collected explicitly).
    Only the text ctx is de-mixed in ``official`` mode (the released ``sple_promptkd.py``); the rest trains directly.
    Scoring (the released trainer's first step): the teacher's own image features against its frozen class text features.
    """

    image_uses_prompts = True

    def __init__(self, backbone: PromptLearner):
        self.bb = backbone
        teacher_named = dict(backbone.teacher.named_parameters())
        self.text_names = ["teacher.prompts.ctx"] + [
            f"teacher.{n}" for n in teacher_named if n.startswith("prompts.text_deep.")]
        self.student_names = [n for n, p in backbone.named_parameters() if p.requires_grad]
        self.prompt_names = self.student_names + self.text_names
        self.demix_names = ["teacher.prompts.ctx"]
        self.buffer_names = [f"projector.{n}" for n, _ in backbone.projector.named_buffers()]
        # official quirk: deep prompts are re-assigned through a python list, so they are not loaded
        self.fresh_in_official = [n for n in self.prompt_names if n.startswith(("vpt_deep.", "teacher.prompts.text_deep."))]

    def image_features(self, images, prompts):
        """[B', 3, H, W] -> [B', E_t] normalised student + projector features with the student tensors (and
        BatchNorm buffers, when given) of ``prompts`` substituted; BN running stats update in train mode."""
        own = {n: t for n, t in prompts.items() if not n.startswith("teacher.")}
        return F.normalize(with_tensors(self.bb, own, self.bb.image_features, images), dim=-1)

    def text_features(self, prompts, class_idx, reference: bool, op_backend: str):
        """[C or n, E_t] normalised teacher text features with the DPC text prompts substituted."""
        teacher = self.bb.teacher
        sub = {n[len("teacher."):]: prompts[n] for n in self.text_names}
        teacher._text_cache = None
        try:
            if class_idx is not None and not reference:
                feats = with_tensors(teacher, sub, lambda: teacher.text_features(class_idx=class_idx))
                return F.normalize(feats, dim=-1)
            feats = F.normalize(with_tensors(teacher, sub, teacher.text_features), dim=-1)
            return feats if class_idx is None else feats[class_idx]
        finally:
            teacher._text_cache = None

    def score_features(self, images):
        """The sampler's ([B, E_t] teacher image features, [C, E_t] teacher text features), normalised."""
        text = self.bb.teacher_text_features()
        return F.normalize(self.bb.teacher.image_features(images), dim=-1), text

    def logits(self, dpc, images, split):
        """base: logit_scale * (student(P') + projector) . (DPC text features)^T, the DPC model's BN stats;
        new: the w_n-mixed student (the inference head's BN stats) against the teacher's frozen text features."""
        prompts = dpc.inference_prompts(split)
        if split == "base":
            image = self.image_features(images, {**prompts, **dpc.bn_buffers()})
            text = dpc.cached_text_features(lambda: self.text_features(prompts, None, dpc.uses_reference, dpc.op_backend))
        else:
            image = self.image_features(images, {n: prompts[n] for n in self.student_names})
            text = self.bb.teacher_text_features()
        return dpc.logit_scale * image.to(text.dtype) @ text.t()


def make_hooks(backbone: PromptLearner):
    if isinstance(backbone, CoOp):
        return _CoOpHooks(backbone)
    if isinstance(backbone, PromptKD):
        return PromptKDHooks(backbone)
    return _GenericHooks(backbone)
