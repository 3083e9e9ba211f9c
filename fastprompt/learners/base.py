"""The public learner base: :class:`PromptLearner` (the frozen CLIP, backend choice, caching, the training
interface, save/load) and :class:`LearnerConfig` (the options every method's config dataclass extends).

A new method is one file in ``fastprompt/learners/``::

    @dataclass
    class MyConfig(LearnerConfig):
        n_ctx: int = 4

    @register_learner("mine")
    class Mine(PromptLearner):
        config_class = MyConfig
        training_defaults = {"epochs": 10, "batch_size": 4, "lr": 0.002}
        tiny_setup = {"n_ctx": 2}

        def forward(self, images): ...   # [B, 3, H, W] -> logits [B, C]
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastprompt._version import __version__
from fastprompt.backbone import TextTower, check_clip_model, clip_source, freeze
from fastprompt.compiling import compile_learner
from fastprompt.interop import InteropMixin
from fastprompt.learners._common import LEARNER_BACKENDS, backbone_identity, default_tokenizer, load_into, write_adapter
from fastprompt.ops._dispatch import env_backend
from fastprompt.validation import check_config_fields

__all__ = ["LearnerConfig", "PromptLearner", "InvalidOptionType"]

# Annotations (as strings: the config modules use postponed evaluation) -> the types a value may have.
_SIMPLE_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


class InvalidOptionType(TypeError, ValueError):
    """A config option of the wrong type (a TypeError, and a ValueError for callers that catch bad values)."""


@dataclass
class LearnerConfig:
    """Options every method's config extends; values are checked when the config is built (ValueError /
    TypeError naming the option).

    Checks made here for every subclass: each field annotated ``int`` / ``float`` / ``bool`` / ``str`` (or
    ``Optional[...]`` of one) holds that type (``bool`` is not an int; floats are finite), the fields of
    ``positive_fields`` present are > 0, those of ``nonnegative_fields`` >= 0, and ``backend`` is a learner
    backend. A subclass adds its own checks by overriding :meth:`validate` (calling ``super().validate()``).
    """

    backend: Optional[str] = None  # None: FASTPROMPT_BACKEND or "auto"

    # (n_ctx: >= 1 unless ctx_init sets the context, checked by check_config_fields; SoftCPT's task_n_ctx may be 0)
    positive_fields: ClassVar[Tuple[str, ...]] = (
        "n_ctx_text", "n_ctx_vision", "num_tokens", "vis_num_tokens", "txt_num_tokens", "top_k",
    )
    nonnegative_fields: ClassVar[Tuple[str, ...]] = ("init_std",)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError / TypeError (naming the option) for a value the method cannot take."""
        # Fields with a non-None default: the value's type and range against the default's
        # (:func:`fastprompt.validation.check_config_fields`: ints are non-negative integers, floats finite and
        # non-negative, ``n_ctx`` >= 1 unless ``ctx_init`` sets the context, ``ctx_init`` single-spaced words).
        check_config_fields(self)
        name = type(self).__name__
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), str(f.type).replace(" ", "")
            optional = kind.startswith("Optional[") and kind.endswith("]")
            base = kind[len("Optional["):-1] if optional else kind
            if base not in _SIMPLE_TYPES or (optional and value is None):
                continue
            ok = isinstance(value, _SIMPLE_TYPES[base]) and (base == "bool" or not isinstance(value, bool))
            if ok and base == "float":
                ok = math.isfinite(value)
            if not ok:
                raise InvalidOptionType(f"{name}.{f.name} must be a{'n' if base == 'int' else ''} {base}"
                                f"{' (finite)' if base == 'float' else ''}{' or None' if optional else ''}, "
                                f"got {value!r}")
        for field_name in self.positive_fields:
            value = getattr(self, field_name, None)
            if isinstance(value, (int, float)) and value <= 0:
                raise ValueError(f"{name}.{field_name} must be > 0, got {value!r}")
        for field_name in self.nonnegative_fields:
            value = getattr(self, field_name, None)
            if isinstance(value, (int, float)) and value < 0:
                raise ValueError(f"{name}.{field_name} must be >= 0, got {value!r}")
        if self.backend is not None and str(self.backend).lower() not in LEARNER_BACKENDS + ("auto",):
            raise ValueError(f"{name}.backend must be one of {', '.join(LEARNER_BACKENDS)} or None, "
                             f"got {self.backend!r}")

    @classmethod
    def build(cls, config=None, overrides: Optional[Mapping[str, Any]] = None):
        """A config of this class from None (defaults), an instance or a dict, plus keyword ``overrides``;
        an unknown option is a TypeError that lists the valid ones."""
        overrides = dict(overrides or {})
        if config is None:
            config = {}
        if isinstance(config, Mapping):
            overrides = {**config, **overrides}
            config = None
        elif not isinstance(config, cls):
            raise TypeError(f"config must be a {cls.__name__} or a dict, got {type(config).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"{cls.__name__} has no option(s) {sorted(unknown)}; options: {sorted(names)}")
        if config is None:
            return cls(**overrides)
        return dataclasses.replace(config, **overrides) if overrides else config


class PromptLearner(InteropMixin, nn.Module):
    """Base of the learners: holds the frozen CLIP as ``self.clip``; subclasses add parameters and forward.

    A subclass sets ``config_class`` (a :class:`LearnerConfig` subclass) and registers itself with
    ``@register_learner(name)``; ``__init__(clip_model, classnames, config=None, tokenizer=None, **overrides)``
    resolves ``self.config`` from a config instance or dict plus keyword overrides. What the rest of the package
    needs to know about a method is declared here too, as class attributes (read through the registry):

    ``training_defaults``
        The official optimisation settings (epochs (None: by shots), batch_size, lr, and optionally weight_decay,
        warmup_epoch, lr_scheduler, lr_batch_scaling, ``lr_by_dataset``, ``learner_by_dataset``, ``base2new``);
        ``fastprompt.training.config.method_defaults`` reads them ({}: the generic defaults).
    ``base2new_training``
        How a base-to-new run trains ({"train_subsample", "shots"} overrides; {}: 16 shots of the base classes).
    ``tiny_setup`` / ``tiny_needs_data``
        Options that make the learner build on the tests' toy CLIP (2 vision, 3 text layers, 32 px), and whether
        it needs the training data (``attach_train_data``) before its first step. ``tiny_setup = None``: none.
    ``bench_setup(classnames, dataset, tasks)`` / ``bench_prepare(generator)``
        The training-step benchmark's arguments and in-memory data (``fastprompt bench --step``);
        ``bench_setup = None`` leaves the method out of it.
    ``image_features_frozen``
        True when the logits depend on the images only through ``encode_images`` (the frozen, unprompted CLIP
        image encoder) and the learner has ``logits_from_image_features(v)``: evaluation may then read v from the
        feature store (:mod:`fastprompt.training.feature_store`) instead of encoding the images again.
    """

    method: ClassVar[str] = ""
    config_class: ClassVar[Optional[type]] = None
    training_defaults: ClassVar[Dict[str, Any]] = {}
    base2new_training: ClassVar[Dict[str, Any]] = {}
    tiny_setup: ClassVar[Optional[Dict[str, Any]]] = None
    tiny_needs_data: ClassVar[bool] = False
    # Capabilities a plug-in asks of its base (fastprompt.learners._family.PluginBase): class_text_features
    # takes a per-class context shift (CaPT).
    accepts_class_shift: ClassVar[bool] = False
    image_features_frozen: ClassVar[bool] = False

    def __init__(self, clip_model: nn.Module, classnames: Sequence[str], config=None, tokenizer=None, **overrides):
        super().__init__()
        if self.config_class is not None:
            config = self.config_class.build(config, overrides)
        elif overrides:
            raise TypeError(f"{type(self).__name__} takes no options {sorted(overrides)} (it has no config_class)")
        check_clip_model(clip_model)
        self.clip = freeze(clip_model)
        self.config = config
        self.tower = TextTower(clip_model)
        self.tokenizer = tokenizer if tokenizer is not None else default_tokenizer(self.tower)
        self._backend = "auto"
        self.backend = getattr(config, "backend", None) or env_backend()
        self._text_cache = None

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        # A learner compiled with fastprompt.compile compiles the text encoders it builds later (set_classnames).
        options = self.__dict__.get("_compile_options")
        if options is not None and isinstance(value, nn.Module):
            compile_learner(value, options)

    # ------------------------------------------------------------------ backend
    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        value = str(value).lower()
        if value not in LEARNER_BACKENDS:
            raise ValueError(f"unknown backend {value!r}; choose one of {', '.join(LEARNER_BACKENDS)}")
        reason = self.tower.unsupported_reason()
        if value != "reference" and reason is not None:
            if value != "auto":
                raise ValueError(f"backend {value!r} needs the fast engine, which cannot run this model: {reason}")
            value = "reference"  # auto on a tower the engine cannot run exactly
        self._backend = value
        self._text_cache = None

    @property
    def op_backend(self) -> str:
        """The op backend the fast engine uses."""
        return "reference" if self._backend == "torch" else self._backend

    @property
    def uses_reference(self) -> bool:
        return self._backend == "reference"

    # ------------------------------------------------------------------ images
    @property
    def dtype(self) -> torch.dtype:
        return self.tower.dtype

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] float images (already normalised) -> [B, E] unnormalised frozen image features."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4:
            raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError("images is an empty batch (B = 0); pass at least one image")
        if not images.is_floating_point():
            raise TypeError(
                f"images must be floating point (normalised as the model's preprocess does), got {images.dtype}"
            )
        size = getattr(self.clip.visual, "image_size", None)
        if size is not None:
            size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
            if tuple(images.shape[-2:]) != size or images.shape[1] != 3:
                raise ValueError(
                    f"images must be [B, 3, {size[0]}, {size[1]}] for this model, got {tuple(images.shape)}"
                )
        visual_dtype = next(self.clip.visual.parameters()).dtype
        with torch.no_grad():  # frozen tower, and nothing upstream of it learns
            return self.clip.encode_image(images.to(visual_dtype))

    def frozen_text_features(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Plain strings -> [N, E] unnormalised features of the frozen CLIP text encoder (``encode_text``),
        without gradient. Used for hand-crafted template features (KgCoOp, CaPT, PromptSRC, SoftCPT)."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        texts = list(texts)
        device = self.tower.token_embedding.weight.device
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                ids = torch.as_tensor(self.tokenizer(list(texts[i : i + batch_size])), dtype=torch.long)
                out.append(self.clip.encode_text(ids.to(device)))
        if not out:
            raise ValueError("texts is empty")
        return torch.cat(out)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    # ------------------------------------------------------------------ caching of text features
    def _trainable_key(self):
        return tuple((id(p), p.data_ptr(), p._version, p.dtype, p.device, tuple(p.shape))
                     for p in self.parameters() if p.requires_grad)

    def cached_text_features(self, compute) -> torch.Tensor:
        """Text features that do not depend on the image: in eval mode under no_grad, computed once and
        reused until a trainable tensor changes (optimizer step, load, any in-place edit) or the mode/backend
        changes.

        A tensor's version counter misses edits through ``.data`` (``learner.ctx.data += 1``) and raw storage,
        so the cache also keeps a copy of the trainable tensors and compares values before reusing (one fused
        comparison, one host read per call; the tensors are the small learnable prompts).
        """
        if self.training or torch.is_grad_enabled():
            self._text_cache = None
            return compute()
        params = [p for p in self.parameters() if p.requires_grad]
        key = (self._trainable_key(), self._backend)
        if self._text_cache is not None and self._text_cache[0] == key:
            snapshot = self._text_cache[2]
            changed = bool(torch.stack([(s != p).any() for s, p in zip(snapshot, params)]).any()) if params else False
            if not changed:  # (NaN != NaN: a NaN tensor is never reused, always recomputed)
                return self._text_cache[1]
        feats = compute()
        self._text_cache = (key, feats, [p.detach().clone() for p in params])
        return feats

    def clear_cache(self) -> None:
        """Drop the cached eval-mode text features (they are recomputed on the next call)."""
        self._text_cache = None

    def train(self, mode: bool = True):
        self._text_cache = None
        super().train(mode)
        self.clip.eval()  # the frozen backbone always runs in eval mode (no dropout), as in the official code
        return self

    # ------------------------------------------------------------------ training interface
    # The trainer (fastprompt.training) only talks to a learner through these methods, so a method whose
    # loss needs more than its logits (KgCoOp, CaPT, PromptSRC, DPC, ...) overrides compute_loss.
    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on the logits of :meth:`forward`."""
        return F.cross_entropy(logits, labels)

    def compute_loss(self, images: torch.Tensor, labels: torch.Tensor):
        """One training step's objective: images [B, 3, H, W], labels [B] -> (loss [], logits [B, C])."""
        logits = self(images)
        return self.loss(logits, labels), logits

    def param_groups(self, lr: float):
        """Optimizer parameter groups at base learning rate ``lr`` (methods with staged LRs override)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    def on_epoch_end(self, epoch: int, max_epoch: int) -> None:
        """Called by the trainer after each epoch (0-based); e.g. PromptSRC's Gaussian prompt aggregation."""

    def attach_train_data(self, dataset) -> None:
        """Called once by the trainer with the training dataset (DPC builds its hard-negative image library)."""

    # ------------------------------------------------------------------ state
    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """Only the learnable tensors, detached."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def print_trainable_parameters(self) -> None:
        total = sum(p.numel() for p in self.parameters())
        n = self.num_trainable_parameters()
        print(f"trainable params: {n:,} || all params: {total:,} || trainable%: {100 * n / max(total, 1):.4f}")

    def save_pretrained(self, directory: str) -> None:
        """Write the learnable tensors (safetensors) and a JSON config to ``directory``, as one whole save that
        records the backbone (:mod:`fastprompt.learners.adapter_io`)."""
        name, pretrained = clip_source(self.clip)
        meta = {
            "method": self.method,
            "config": dataclasses.asdict(self.config),
            "classnames": list(self.classnames),
            "clip_model": name,
            "clip_pretrained": pretrained,
            "clip_backbone": backbone_identity(self.clip),
            "fastprompt_version": __version__,
        }
        write_adapter(directory, meta, self.trainable_state_dict())

    def load_trainable_state_dict(self, tensors: Dict[str, torch.Tensor]) -> None:
        load_into(self, tensors, self.method)

    # ------------------------------------------------------------------ declared setups (see the class docstring)
    @classmethod
    def tiny_classnames(cls, names: Sequence[str]):
        """The class list a tiny setup passes for ``names`` (SoftCPT: tasks of classes)."""
        return list(names)

    @classmethod
    def bench_setup(cls, classnames: Sequence[str], dataset: str = "imagenet", tasks: int = 2):
        """(classes, options) of the training-step benchmark's learner on ``classnames``."""
        return list(classnames), {}

    def bench_prepare(self, generator: torch.Generator) -> None:
        """In-memory data the benchmark's learner needs before its first step (drawn from ``generator``)."""


