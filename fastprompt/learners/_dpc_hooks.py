"""DPC's backbone hooks: how the parallel prompt P' drives each kind of tuned backbone (fastprompt/learners/dpc.py).

Each hook object exposes ``image_features(images, prompts) -> [B', E]`` and ``text_features(prompts, class_idx,
reference, op_backend) -> [C or n, E]`` (L2-normalised), with the DPC prompt tensors substituted into the frozen
backbone through ``torch.func.functional_call`` so that autograd reaches them and the backbone's own tensors are
untouched; ``image_uses_prompts`` says whether the image side depends on them (CoOp: no, so DPC reuses the
scoring image features). What differs per backbone beyond that (the library transform, the starting prompt, the
adapter's extra tensors, the split-specific heads) is a hook method too, so ``DPC`` itself never asks which kind
of backbone it holds. A PromptKD backbone also has ``score_features`` (the sampler's features) and ``logits``.
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from fastprompt.backbone import eval_preprocess
from fastprompt.learners._hard_negatives import default_train_transform
from fastprompt.learners.base import PromptLearner
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
    return functional_call(_Call(module), {f"m.{k}": v for k, v in tensors.items()}, (fn,) + args, strict=False)


class BackboneHooks:
    """What every DPC backbone kind shares; subclasses override what their released trainer does differently."""

    image_uses_prompts = True
    # DPC's logits see the images only through the backbone's frozen ``encode_images``, L2-normalised (the
    # feature store may then supply them)
    image_features_frozen = False
    modes = ("official", "paper", "simple", "void")

    def library_transform(self, clip_model: nn.Module) -> Callable:
        """The transform of the hard-negative library images (``sple_coop.py``: the CLIP training transform)."""
        size = getattr(clip_model.visual, "image_size", 224)
        return default_train_transform(size[0] if isinstance(size, (tuple, list)) else int(size))

    def initial_prompts(self, mode: str, seed: Optional[int]) -> Dict[str, torch.Tensor]:
        """{name: tensor} the trained DPC tensor starts from: P itself, or (``void``) a freshly initialised
        backbone's tensors, as the released learner never loads P into it."""
        if mode == "void":
            bb = self.bb
            fresh = type(bb)(bb.clip, bb.classnames, config=bb.config, tokenizer=bb.tokenizer)
            return dict(fresh.named_parameters())
        return dict(self.bb.named_parameters())

    def extra_state(self, dpc) -> Dict[str, torch.Tensor]:
        """Adapter tensors besides ``tuned.*`` and DPC's own (none for most backbones)."""
        return {}

    def load_state(self, dpc, tensors: Dict[str, torch.Tensor], tuned: Dict[str, torch.Tensor]) -> None:
        """Copy the stored P (``tuned``) and the :meth:`extra_state` tensors back in place."""
        P = dpc.tuned_prompts()
        with torch.no_grad():
            for n, v in tuned.items():
                P[n].copy_(v)


class _CoOpHooks(BackboneHooks):
    """CoOp as a DPC backbone: frozen image tower; class features through the engine for any class subset."""

    image_uses_prompts = False
    image_features_frozen = True

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


class _GenericHooks(BackboneHooks):
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


class PromptKDHooks(BackboneHooks):
    """PromptKD (+DPC, ``sple_promptkd.py``) as a DPC backbone.

    DPC prompts: the student's trainable tensors (``vpt``, ``vpt_deep.*``, ``projector.*``) and the frozen
    PromptSRC teacher's *text* prompts (``teacher.prompts.ctx``, ``teacher.prompts.text_deep.*``): the DPC model
    classifies with the teacher's text tower driven by P' (frozen inside PromptKD, so collected explicitly).
    Only the text ctx is de-mixed in ``official`` mode (the released ``sple_promptkd.py``); the rest trains directly.
    Scoring (the released trainer's first step): the teacher's own image features against its frozen class text features.
    """

    image_uses_prompts = True
    modes = ("official", "paper")

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

    def library_transform(self, clip_model: nn.Module) -> Callable:
        """``sple_promptkd.py`` reads the negatives with the test transform: the backbone's own preprocessing."""
        return eval_preprocess(clip_model)

    def initial_prompts(self, mode: str, seed: Optional[int]) -> Dict[str, torch.Tensor]:
        """P cloned; ``official`` starts the deep prompts the released list re-assignment fails to load from
        N(0, std^2) (student ``init_std`` for ``vpt_deep.*``, the teacher's for its ``text_deep.*``), drawn from a
        generator seeded with ``seed`` (the global torch RNG when None)."""
        named = dict(self.bb.named_parameters())
        init = dict(named)
        if mode == "official":
            gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
            for n in self.fresh_in_official:
                std = self.bb.teacher.config.init_std if n.startswith("teacher.") else self.bb.config.init_std
                t = named[n]
                init[n] = torch.empty(t.shape, dtype=t.dtype).normal_(0.0, float(std), generator=gen).to(t.device)
        return init

    def extra_state(self, dpc) -> Dict[str, torch.Tensor]:
        """The rest of the backbone's adapter (``head.*``: teacher image prompts, the head's BN statistics) and
        DPC's own BN statistics (``buffers.*``)."""
        out = {f"head.{k}": v for k, v in self.bb.trainable_state_dict().items() if k not in self.prompt_names}
        out.update({f"buffers.{n}": b.detach() for n, b in dpc.bn_buffers().items()})
        return out

    def load_state(self, dpc, tensors: Dict[str, torch.Tensor], tuned: Dict[str, torch.Tensor]) -> None:
        # the backbone is frozen here, so its own loader takes the teacher's tensors and the BN statistics
        # (it checks their names and shapes); the student's P is copied directly
        head = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
        self.bb.load_trainable_state_dict({**head, **{n: v for n, v in tuned.items() if n.startswith("teacher.")}})
        P = dpc.tuned_prompts()
        with torch.no_grad():
            for n, v in tuned.items():
                if not n.startswith("teacher."):
                    P[n].copy_(v)
        own = dpc.bn_buffers()
        got = {k[len("buffers."):]: v for k, v in tensors.items() if k.startswith("buffers.")}
        if sorted(got) != sorted(own):
            raise ValueError(f"DPC adapter must hold buffers.{sorted(own)}, got buffers.{sorted(got)}")
        with torch.no_grad():
            for n, v in got.items():
                own[n].copy_(v)

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
