"""PromptKD (Li et al., CVPR'24): unsupervised prompt distillation from a PromptSRC teacher.

The teacher is a trained PromptSRC learner on a large CLIP (ViT-L/14 in the paper), frozen and in eval mode.
The student is a (smaller) CLIP image tower with IVLP visual prompts (``vpt`` appended after the patches
before ``ln_pre``, deep ``vpt_deep`` overwriting them before blocks 1 .. depth-1) followed by the projector
``VPT_image_trans`` of the official code: ``Conv2d(E_s, E_t, 1) -> BatchNorm2d(E_t) -> ReLU -> Conv2d(E_t, E_t, 1)``
run on the [B, E_s, 1, 1] view of the student's pooled image feature. The student's text tower is never used:
it classifies with the *teacher's* (L2-normalised) class text features::

    s = student logit_scale * norm(projector(student(x))) @ norm(T_teacher).T            # [B, C]
    t = teacher logit_scale * norm(teacher_image(x)) @ norm(T_teacher).T                 # [B, C], no grad
    loss = kd_weight * KL(softmax(t / T) || softmax(s / T)) summed over [B, C] * T^2 / (B * C)

(``F.kl_div(log_softmax(s / T), softmax(t / T), reduction="sum") * T * T / s.numel()``, then ``KD_WEIGHT``: the
official ``forward_backward``.) Labels are not used: PromptKD trains transductively on the unlabelled training
images of *all* classes, with the teacher's text features of all classes; base / new evaluation uses the
teacher's features of that split (``set_classnames``).

Exactness. Reference (``backend="reference"``) = the official step: the teacher's text features re-encoded at
77 tokens every call, the teacher's and the student's image towers through the re-concatenating reference
vision loop. Fast: the frozen teacher's text features are computed once per class list (cache keyed on the
class names, the backend and the teacher's tensors, so ``set_classnames`` or a teacher change invalidates it),
teacher and student image features through the fast prompted vision encoder. The projector is the same module
on both paths (it is a few [B, E] GEMMs). BatchNorm follows the module mode: batch statistics and running-stat
updates in training, running statistics in eval, as the official code (the teacher stays in eval mode).

Saving. The adapter carries the student's trainable tensors, the projector's BatchNorm running statistics
(``buffers.*``: eval after a reload needs them) and the teacher's prompt tensors (``teacher.*``); the JSON
config records the teacher's method, config and CLIP, so ``from_pretrained`` rebuilds the pair.

Official defaults (``configs/trainers/PromptKD/vit_b16_c2_ep20_batch8_4+4ctx.yaml`` and the base2new
scripts): 4 vision tokens, depth 9, T = 1, KD_WEIGHT = 1000 (the YAML says 1.0, every script passes 1000),
SGD lr 0.005, batch 8, 20 epochs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastprompt._version import __version__
from fastprompt.backbone import clip_source
from fastprompt.backbone import load_clip
from fastprompt.learners._common import (
    backbone_identity, load_into, load_pretrained_tensors, read_pretrained, write_adapter,
)
from fastprompt.learners.adapter_io import check_backbone
from fastprompt.learners._deep_prompts import prompted_image_features, visual_width
from fastprompt.learners._family import forwarding_backend
from fastprompt.learners.base import LearnerConfig, PromptLearner
from fastprompt.learners.pretrained import from_pretrained
from fastprompt.learners.registry import create_learner, register_learner

STUDENT_CLIP = "student"  # ``teacher_clip`` value: the teacher runs on the student's own CLIP


@dataclass
class PromptKDConfig(LearnerConfig):
    """``TRAINER.PROMPTKD.*`` (student side) plus how to obtain the teacher.

    The teacher comes from (first that applies): the ``teacher=`` constructor argument (a learner or a
    ``save_pretrained`` directory); ``teacher_dir`` (a saved PromptSRC adapter, loaded with
    ``fastprompt.from_pretrained``); or ``teacher_method`` + ``teacher_config`` built on ``teacher_clip``
    (an open_clip name for ``fastprompt.load_clip``, or ``"student"`` for the student's CLIP), with its tensors
    loaded from a PromptKD adapter (that is how ``from_pretrained`` rebuilds a saved PromptKD).
    """

    n_ctx_vision: int = 4
    prompt_depth_vision: int = 9
    temperature: float = 1.0
    kd_weight: float = 1000.0
    init_std: float = 0.02
    teacher_dir: Optional[str] = None
    teacher_method: str = "promptsrc"
    teacher_config: Dict[str, Any] = field(default_factory=dict)
    teacher_clip: str = ""
    teacher_clip_pretrained: Optional[str] = None

    def validate(self) -> None:
        super().validate()
        _check_config(self)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """PromptKD's L_ukd: student / teacher logits [B, C] -> KL(p_t || p_s) at temperature T, summed over [B, C],
    times T^2, divided by B * C (the official reduction; ``kd_weight`` is applied by the caller)."""
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"student and teacher logits must both be [B, C], got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}"
        )
    T = float(temperature)
    target = F.softmax(teacher_logits.to(student_logits.dtype) / T, dim=1)
    kl = F.kl_div(F.log_softmax(student_logits / T, dim=1), target, reduction="sum")
    return kl * (T * T) / student_logits.numel()


def _projector(e_s: int, e_t: int, like: torch.Tensor) -> nn.Sequential:
    """``VPT_image_trans``: 1x1 conv E_s -> E_t, BatchNorm2d(E_t), ReLU, 1x1 conv E_t -> E_t (PyTorch default init)."""
    return nn.Sequential(
        nn.Conv2d(e_s, e_t, 1), nn.BatchNorm2d(e_t), nn.ReLU(), nn.Conv2d(e_t, e_t, 1)
    ).to(dtype=like.dtype, device=like.device)


@register_learner("promptkd")
class PromptKD(PromptLearner):
    """PromptKD student. ``forward(images [B, 3, H, W]) -> logits [B, C]`` against the teacher's class text
    features; ``compute_loss(images, labels) -> (kd_weight * L_ukd [], student logits [B, C])`` (labels unused).
    Trainable: ``vpt`` [Mv, Dv], ``vpt_deep`` (depth-1) x [Mv, Dv], ``projector.*`` (conv, BN affine, conv).
    """

    method = "promptkd"
    config_class = PromptKDConfig
    # PromptKD/vit_b16_c2_ep20_batch8_4+4ctx.yaml (trains on the unlabelled images of all classes; the
    # scripts pass NUM_SHOTS 0, i.e. the full training set, and KD_WEIGHT 1000 / T 1, the learner's defaults)
    # KD_WEIGHT 200 for FGVCAircraft and Flowers102 (scripts/promptkd/base2new_train.sh).
    training_defaults = {"epochs": 20, "batch_size": 8, "lr": 0.005,
                         "learner_by_dataset": {"fgvc_aircraft": {"kd_weight": 200.0}, "oxford_flowers": {"kd_weight": 200.0}}}
    # Base-to-new: distils on the unlabelled training images of *all* classes (NUM_SHOTS 0, no SUBSAMPLE_CLASSES).
    base2new_training = {"train_subsample": "all", "shots": -1}
    # The teacher: a PromptSRC built on the student's own toy CLIP (the real one is a trained ViT-L/14).
    tiny_setup = {"n_ctx_vision": 2, "prompt_depth_vision": 2, "teacher_clip": "student",
                  "teacher_config": {"n_ctx_text": 2, "n_ctx_vision": 2, "prompt_depth_text": 2, "prompt_depth_vision": 2}}
    bench_setup = None  # no training-step benchmark (the teacher is another CLIP)

    def __init__(self, clip_model: nn.Module, classnames: Sequence[str], config=None, tokenizer=None,
                 teacher=None, teacher_clip: Optional[nn.Module] = None, teacher_tokenizer=None, **kwargs):
        super().__init__(clip_model, classnames, config, tokenizer, **kwargs)
        config = self.config
        teacher = self._build_teacher(teacher, teacher_clip, teacher_tokenizer, classnames)
        for name in ("text_features", "image_features", "set_classnames"):
            if not callable(getattr(teacher, name, None)):
                raise TypeError(f"the PromptKD teacher must be a learner with {name}() (a PromptSRC); "
                                f"{type(teacher).__name__} has none")
        # The teacher's prompt tensors (its own, not its frozen CLIP): frozen here, saved in the adapter.
        self.teacher_names = [n for n, _ in teacher.named_parameters() if not n.startswith("clip.")]
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher = teacher.eval()
        self.teacher.backend = self.backend
        t_dim, t_text = int(teacher.clip.visual.output_dim), _text_dim(teacher)
        if t_text is not None and t_text != t_dim:
            raise ValueError(f"teacher image features are {t_dim}-d but its text features {t_text}-d")
        self.config = dataclasses.replace(
            config, teacher_method=teacher.method, teacher_config=_plain_config(teacher),
            teacher_clip=config.teacher_clip or _clip_name(teacher.clip, clip_model),
            teacher_clip_pretrained=config.teacher_clip_pretrained or clip_source(teacher.clip)[1],
        )
        n_layers = len(self.clip.visual.transformer.resblocks)
        if not 1 <= config.prompt_depth_vision <= n_layers:
            raise ValueError(f"prompt_depth_vision must be in 1..{n_layers}, got {config.prompt_depth_vision}")
        dv, like = visual_width(self.clip), self.clip.visual.conv1.weight
        kw = {"dtype": like.dtype, "device": like.device}

        def prompt():
            return nn.Parameter(nn.init.normal_(torch.empty(config.n_ctx_vision, dv, **kw), std=config.init_std))

        self.vpt = prompt()
        self.vpt_deep = nn.ParameterList([prompt() for _ in range(config.prompt_depth_vision - 1)])
        self.projector = _projector(int(self.clip.visual.output_dim), t_dim, like)
        self._teacher_text = None
        self.set_classnames(classnames)

    # ------------------------------------------------------------------ teacher
    def _build_teacher(self, teacher, teacher_clip, teacher_tokenizer, classnames) -> PromptLearner:
        cfg = self.config
        if teacher is None and cfg.teacher_dir:
            teacher = cfg.teacher_dir
        if isinstance(teacher, str):
            return from_pretrained(teacher, clip_model=teacher_clip, classnames=classnames, tokenizer=teacher_tokenizer)
        if teacher is not None:
            if not isinstance(teacher, PromptLearner):
                raise TypeError(f"teacher must be a PromptSRC learner or a save_pretrained directory, got "
                                f"{type(teacher).__name__}")
            return teacher
        if not cfg.teacher_config:
            raise ValueError("PromptKD needs a teacher: pass teacher=<PromptSRC learner or adapter directory>, "
                             "or set teacher_dir / teacher_config")
        if teacher_clip is None:
            if cfg.teacher_clip == STUDENT_CLIP:
                teacher_clip, teacher_tokenizer = self.clip, teacher_tokenizer or self.tokenizer
            elif cfg.teacher_clip:
                teacher_clip, _, tok = load_clip(cfg.teacher_clip, pretrained=cfg.teacher_clip_pretrained)
                teacher_tokenizer = teacher_tokenizer or tok
            else:
                raise ValueError("the teacher's CLIP is not recorded (it did not come from fastprompt.load_clip): "
                                 "pass teacher_clip=")
        return create_learner(cfg.teacher_method, teacher_clip, classnames, config=dict(cfg.teacher_config),
                              tokenizer=teacher_tokenizer)

    backend = forwarding_backend("teacher", clear=("_teacher_text",), follow_child=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the official trainer keeps the teacher in eval mode throughout
        return self

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Classify ``classnames`` with the teacher's text features of them (base -> new)."""
        self.teacher.set_classnames(classnames)
        self.classnames = list(self.teacher.classnames)
        self._teacher_text = self._text_cache = None

    def teacher_text_features(self) -> torch.Tensor:
        """[C, E_t] L2-normalised teacher class text features, no grad. Reference: re-encoded at 77 tokens on
        every call (the official teacher forward); fast: once per (classes, backend, teacher tensors)."""
        if self.uses_reference:
            with torch.no_grad():
                return F.normalize(self.teacher.text_features(), dim=-1)
        # Keyed on the teacher's prompt tensors only: its CLIP is frozen, and walking all of a ViT-L/14's
        # parameters on every step would cost more than it guards.
        prompts = (self.teacher.get_parameter(n) for n in self.teacher_names)
        key = (self._backend, tuple(self.classnames),
               tuple((id(t), t._version, t.dtype, t.device) for t in prompts))
        if self._teacher_text is None or self._teacher_text[0] != key:
            with torch.no_grad():
                self._teacher_text = (key, F.normalize(self.teacher.text_features(), dim=-1))
        return self._teacher_text[1]

    def teacher_logits(self, images: torch.Tensor, text: Optional[torch.Tensor] = None) -> torch.Tensor:
        """images [B, 3, H, W] -> teacher logits [B, C] = teacher logit_scale * cos(teacher image, text), no grad."""
        text = self.teacher_text_features() if text is None else text
        with torch.no_grad():
            v = F.normalize(self.teacher.image_features(images), dim=-1)
            return self.teacher.logit_scale * v.to(text.dtype) @ text.t()

    # ------------------------------------------------------------------ student
    def vision_prompts(self) -> Dict[int, torch.Tensor]:
        """{block i: [Mv, Dv]}: ``vpt`` enters block 0, ``vpt_deep[i-1]`` overwrites it before block i."""
        return {0: self.vpt, **{i + 1: p for i, p in enumerate(self.vpt_deep)}}

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The projector on pooled features [B, E_s] -> [B, E_t] (the official [B, E, 1, 1] conv view)."""
        return self.projector(features[:, :, None, None]).flatten(1)

    def image_features(self, images: torch.Tensor, prompts: Optional[Dict[int, torch.Tensor]] = None) -> torch.Tensor:
        """images [B, 3, H, W] -> [B, E_t] unnormalised projected student features (reference: the official
        re-concatenating vision loop; fast: the fast prompted vision encoder). ``prompts`` overrides the
        student's vision prompts ({block: [Mv, Dv]})."""
        v = prompted_image_features(self, images, self.vision_prompts() if prompts is None else prompts)
        return self.project(v)

    def student_logits(self, images: torch.Tensor, text: Optional[torch.Tensor] = None) -> torch.Tensor:
        """images [B, 3, H, W] -> [B, C] = student logit_scale * cos(projected student image, teacher text)."""
        text = self.teacher_text_features() if text is None else text
        v = F.normalize(self.image_features(images), dim=-1)
        return self.logit_scale * v.to(text.dtype) @ text.t()

    forward = student_logits

    def compute_loss(self, images: torch.Tensor, labels: torch.Tensor):
        """images [B, 3, H, W], labels [B] (unused by the loss) -> (kd_weight * L_ukd [], student logits [B, C])."""
        if isinstance(labels, torch.Tensor) and labels.shape[:1] != images.shape[:1]:
            raise ValueError(f"labels must be [B={images.shape[0]}], got shape {tuple(labels.shape)}")
        text = self.teacher_text_features()
        t = self.teacher_logits(images, text)
        s = self.student_logits(images, text)
        return self.config.kd_weight * kd_loss(s, t, self.config.temperature), s

    # ------------------------------------------------------------------ state
    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """Student tensors, the projector's BatchNorm buffers (``buffers.*``) and the teacher's prompt tensors
        (``teacher.*``)."""
        out = super().trainable_state_dict()
        out.update({f"buffers.projector.{n}": b.detach() for n, b in self.projector.named_buffers()})
        named = dict(self.teacher.named_parameters())
        out.update({f"teacher.{n}": named[n].detach() for n in self.teacher_names})
        return out

    def load_trainable_state_dict(self, tensors: Dict[str, torch.Tensor]) -> None:
        teacher = {k[len("teacher."):]: v for k, v in tensors.items() if k.startswith("teacher.")}
        buffers = {k[len("buffers.projector."):]: v for k, v in tensors.items() if k.startswith("buffers.projector.")}
        own_t, own_b = dict(self.teacher.named_parameters()), dict(self.projector.named_buffers())
        for got, want, what in ((teacher, self.teacher_names, "teacher."), (buffers, own_b, "buffers.projector.")):
            if sorted(got) != sorted(want):
                raise ValueError(f"PromptKD adapter must hold {what}{sorted(want)}, got {what}{sorted(got)}")
        with torch.no_grad():
            for src, own in ((teacher, own_t), (buffers, own_b)):
                for n, v in src.items():
                    if own[n].shape != v.shape:
                        raise ValueError(f"{n}: stored shape {tuple(v.shape)} != {tuple(own[n].shape)}")
                    own[n].copy_(v)
        rest = {k: v for k, v in tensors.items() if not k.startswith(("teacher.", "buffers.projector."))}
        load_into(self, rest, self.method)
        self._teacher_text = self._text_cache = None

    def save_pretrained(self, directory: str) -> None:
        """The adapter (see the module docstring); ``teacher_dir`` is dropped from the stored config because
        the teacher's tensors travel inside the adapter."""
        name, pretrained = clip_source(self.clip)
        config = dataclasses.replace(self.config, teacher_dir=None)
        meta = {"method": self.method, "config": dataclasses.asdict(config),
                "classnames": list(self.classnames), "clip_model": name, "clip_pretrained": pretrained,
                "clip_backbone": backbone_identity(self.clip), "fastprompt_version": __version__}
        write_adapter(directory, meta, self.trainable_state_dict())

    @classmethod
    def from_pretrained(cls, directory: str, clip_model: nn.Module, teacher_clip: Optional[nn.Module] = None,
                        classnames: Optional[Sequence[str]] = None, tokenizer=None, teacher_tokenizer=None,
                        strict_backbone: bool = True, **overrides):
        """Rebuild a saved PromptKD on ``clip_model`` (student) and ``teacher_clip`` (needed when the teacher's
        CLIP cannot be rebuilt by name; ``fastprompt.from_pretrained`` works when it can)."""
        meta = read_pretrained(directory)
        if meta.get("method") != cls.method:
            raise ValueError(f"{directory} holds a {meta.get('method')!r} adapter, not promptkd")
        check_backbone(directory, meta, clip_model, strict=strict_backbone)
        config = {**meta["config"], **overrides}
        learner = cls(clip_model, classnames or meta["classnames"], config=config, tokenizer=tokenizer,
                      teacher_clip=teacher_clip, teacher_tokenizer=teacher_tokenizer)
        learner.load_trainable_state_dict(load_pretrained_tensors(directory))
        return learner


def _check_config(config: PromptKDConfig) -> None:
    for name in ("n_ctx_vision", "prompt_depth_vision"):
        v = getattr(config, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not float(config.temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {config.temperature!r}")
    if not isinstance(config.teacher_config, dict):
        raise TypeError(f"teacher_config must be a dict, got {type(config.teacher_config).__name__}")


def _text_dim(teacher) -> Optional[int]:
    proj = getattr(teacher.tower, "text_projection", None) if hasattr(teacher, "tower") else None
    if isinstance(proj, torch.Tensor):
        return int(proj.shape[-1])
    if isinstance(proj, nn.Linear):
        return int(proj.out_features)
    return None


def _plain_config(teacher) -> Dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(teacher.config).items() if k != "backend"}


def _clip_name(teacher_clip, student_clip) -> str:
    if teacher_clip is student_clip:
        return STUDENT_CLIP
    return clip_source(teacher_clip)[0] or ""
