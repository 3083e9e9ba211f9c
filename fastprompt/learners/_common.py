"""What every learner shares: the frozen CLIP, image checks, backend choice, caching, save/load."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastprompt._version import __version__
from fastprompt.backbone import TextTower, check_clip_model, clip_source, freeze
from fastprompt.interop import InteropMixin
from fastprompt.learners.adapter_io import (  # noqa: F401 - write_adapter and the file names are re-exported
    CONFIG_FILE, WEIGHTS_FILE, backbone_identity, read_adapter_meta, read_adapter_tensors, write_adapter,
)
from fastprompt.ops._dispatch import BACKENDS, env_backend
from fastprompt.validation import check_config_fields, check_ctx_init


# Learner backends: "reference" runs the official 77-token computation; every other value runs the fast
# engine, with its ops on that backend ("torch" = the fast engine on eager torch ops).
LEARNER_BACKENDS = ("reference", "torch") + tuple(b for b in BACKENDS if b != "reference")


def default_tokenizer(tower: TextTower):
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=tower.context_length)


class PromptLearner(InteropMixin, nn.Module):
    """Base of the learners: holds the frozen CLIP as ``self.clip``; subclasses add parameters and forward."""

    method: str = ""
    config_class: type = None
    # True when the logits depend on the images only through ``encode_images`` (the frozen, unprompted CLIP image
    # encoder) and the learner has ``logits_from_image_features(v)``: evaluation may then read v from the feature
    # store (fastprompt/training/feature_store.py) instead of encoding the images again.
    image_features_frozen: bool = False

    def __init__(self, clip_model: nn.Module, classnames: Sequence[str], config, tokenizer=None):
        super().__init__()
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
            from fastprompt.compiling import compile_learner

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


def load_into(module: nn.Module, tensors: Dict[str, torch.Tensor], method: str) -> None:
    """Copy ``tensors`` ({name: tensor}) into the trainable parameters of ``module``, in place, without grad.

    The names must be exactly the module's trainable parameter names and every shape must match
    (ValueError naming the missing / unexpected names or the mismatched shape otherwise).
    """
    own = {n: p for n, p in module.named_parameters() if p.requires_grad}
    missing, unexpected = set(own) - set(tensors), set(tensors) - set(own)
    if missing or unexpected:
        raise ValueError(f"adapter does not match {method}: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    with torch.no_grad():
        for name, value in tensors.items():
            if own[name].shape != value.shape:
                raise ValueError(f"{name}: stored shape {tuple(value.shape)} != {tuple(own[name].shape)}")
            own[name].copy_(value)


def read_pretrained(directory: str) -> Dict[str, Any]:
    """The config of the adapter in ``directory`` (see :mod:`fastprompt.learners.adapter_io`)."""
    return read_adapter_meta(directory)


def load_pretrained_tensors(directory: str) -> Dict[str, torch.Tensor]:
    return read_adapter_tensors(directory)


def config_from(config_class, config, overrides: Dict[str, Any]):
    """A config dataclass from an instance or dict plus keyword overrides; unknown keys are an error, and so
    are values of the wrong type or out of range (:func:`fastprompt.validation.check_config_fields`)."""
    if config is None:
        config = config_class()
    elif isinstance(config, dict):
        config = config_from(config_class, None, config)
    names = {f.name for f in dataclasses.fields(config_class)}
    unknown = set(overrides) - names
    if unknown:
        raise TypeError(f"{config_class.__name__} has no option(s) {sorted(unknown)}; options: {sorted(names)}")
    return check_config_fields(dataclasses.replace(config, **overrides))


def context_init(tower: TextTower, tokenizer, ctx_init: str, n_ctx: int, csc: bool, n_cls: int, std: float):
    """Initial context vectors and the prompt prefix string, as CoOp builds them.

    Word init ("a photo of a"): M = number of words, ctx = the words' token embeddings (unified only).
    Random init: N(0, std^2), shape [M, D] or [C, M, D] for class-specific contexts.
    """
    emb = tower.token_embedding
    if ctx_init:
        ctx_init = check_ctx_init(ctx_init)
        n_ctx = len(ctx_init.split(" "))
        ids = torch.as_tensor(tokenizer([ctx_init]), dtype=torch.long).to(emb.weight.device)
        with torch.no_grad():
            vectors = emb(ids)[0, 1 : 1 + n_ctx].clone()
        return vectors, ctx_init, n_ctx
    shape = (n_cls, n_ctx, tower.width) if csc else (n_ctx, tower.width)
    vectors = torch.empty(shape, dtype=emb.weight.dtype, device=emb.weight.device)
    nn.init.normal_(vectors, std=std)
    return vectors, " ".join(["X"] * n_ctx), n_ctx


def plan_kwargs(tower: TextTower) -> Dict[str, Any]:
    return {"context_length": tower.context_length, "pool_type": tower.pool_type, "eos_id": tower.eos_id}
