"""DPC, Dual-Prompt Collaboration (Li et al., CVPR'25), as a plug-in over a tuned backbone learner.

Stage 1 trains a backbone (CoOp; MaPLe / PromptSRC through the same hooks) and ``save_pretrained``s it.
Stage 2 (this learner) keeps the backbone's tuned prompt P frozen, clones it into a parallel prompt P', and
trains P' only, with the Dynamic Hard Negative Optimizer (DHNO): the frozen backbone scores the batch, each
sample gets its mined hard-negative classes (one library image each), and a CLIP-style symmetric InfoNCE runs
over the expanded batch [B', B']. Inference decouples the weights:

* ``mode="official"`` (JREion/DPC, ``converse``): the stored tensor is the mixed prompt
  M = w_b P' + (1 - w_b) P (a trainable ``mixed.*``); every forward de-mixes P' = (M - (1 - w_b) P) / w_b.
  Base classes use P'; since SGD and weight decay act on M, P' effectively trains at lr / w_b^2 with decay
  pulling M (not P') to zero, exactly as the released code.
* ``mode="paper"``: P' itself is trained (``parallel.*``); base classes use w_b P' + (1 - w_b) P.
* ``mode="simple"`` (released ``STACK.MODE simple``, not used by the shipped configs): the trainable ``mixed.*``
  M (= P at the start) is used directly by the forward, i.e. continued fine-tuning of P with the DHNO loss;
  base classes use M; new classes reconstruct P' = (M - (1 - w_b) P) / w_b and use w_n P' + (1 - w_n) P.
* ``mode="void"`` (released ``STACK.MODE void``, ``train.py``'s default): no stacking at all. The released
  prompt learner does not load P into the trained tensor: it is *freshly initialised* as the backbone
  initialises it (CoOp: the ``ctx_init`` words or N(0, 0.02)) and used directly (``parallel.*``, = V); base
  classes use V. ``load_model`` still mixes for new classes (it only special-cases ``simple``), so new classes
  use w_n V + (1 - w_n) P (= P at the default w_n = 0).
* New classes (official / paper): w_n P' + (1 - w_n) P (official: the same, through M and the de-mix).

Exactness: the fast path encodes only the classes the loss needs (the unique labels of the expanded batch),
caches the frozen backbone's class features used for scoring, and reuses the scoring image features of the B
original images when the backbone's image side has no prompts (CoOp). The reference is the official order:
score with the head, encode every class at 77 tokens and index, encode all B' images.

Backbone hooks: a CoOp backbone is driven directly; any other learner must expose
``image_features(images) -> [B, E]`` and ``text_features(class_idx=None) -> [C or n, E]`` (optionally
``image_features_use_prompts = False``); its prompt tensors (its trainable parameters) are substituted with
``torch.func.functional_call`` for each call.
"""
from __future__ import annotations

import dataclasses
import inspect
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastprompt.learners._common import PromptLearner, config_from
from fastprompt.learners._hard_negatives import FALLBACK_RANGES, ImageLibrary, default_train_transform, mine_hard_negatives
from fastprompt.learners.coop import CoOp
from fastprompt.learners.registry import create_learner, register_learner

MODES = ("official", "paper", "simple", "void")


@dataclass
class DPCConfig:
    """``cfg.SPLE.*`` of the CoOp+DPC configs (``vit_b16_ep20``: K=8, w_b=0.5, w_n=0).

    ``train.py``'s own default for ``WEIGHT_FOR_NEW`` is 0.2, but every shipped CoOp config and the README
    set 0.0, which keeps new-class accuracy equal to the backbone's; that is the default here.
    """

    backbone: str = "coop"  # the stage-1 method
    backbone_config: Dict[str, Any] = field(default_factory=dict)
    mode: str = "official"  # "official" (released converse) | "paper" | "simple" | "void" (released modes)
    base_weight: float = 0.5  # w_b, SPLE.STACK.WEIGHT
    new_weight: float = 0.0  # w_n, SPLE.STACK.WEIGHT_FOR_NEW
    top_k: int = 8  # SPLE.INFER_TOPK
    fallback: str = "coop"  # random fallback range: "coop" (1..C-2) or "promptkd" (1..C-1)
    seed: Optional[int] = None  # seed of the sampler's random source (fallback draws, image choice)
    backend: Optional[str] = None


class DPCBatch(NamedTuple):
    """The expanded batch of the DHNO: ``images`` [B', 3, H, W], ``labels`` [B'] (each original followed by
    its negatives), the rows of the originals / negatives, the mined lists, and the head's image features of
    the originals [B, E] (normalised, no grad)."""

    images: torch.Tensor
    labels: torch.Tensor
    orig_rows: torch.Tensor
    neg_rows: torch.Tensor
    negatives: list
    orig_features: torch.Tensor


class _Call(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.m = module

    def forward(self, fn, *args):
        return fn(*args)


def _with_tensors(module: nn.Module, tensors: Dict[str, torch.Tensor], fn: Callable, *args):
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
            feats = F.normalize(_with_tensors(bb, {"ctx": ctx}, bb._reference_text), dim=-1)
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
            return _with_tensors(self.bb, prompts, fn, *args)
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


@register_learner("dpc")
class DPC(PromptLearner):
    """DPC over a tuned backbone. ``forward(images) -> logits [B, C]`` with the prompt of the current split;
    ``compute_loss(images, labels) -> (DHNO loss, contrastive logits [B', B'])``. Trainable: ``mixed.*``
    (official, simple) or ``parallel.*`` (paper, void), one tensor per backbone prompt tensor."""

    method = "dpc"
    config_class = DPCConfig

    def __init__(self, clip_model: nn.Module, classnames: Sequence[str], config=None, tokenizer=None,
                 backbone_learner: Optional[PromptLearner] = None, library: Optional[ImageLibrary] = None,
                 transform: Optional[Callable] = None, load_image: Optional[Callable] = None, **kwargs):
        config = config_from(DPCConfig, config, kwargs)
        if backbone_learner is not None:
            config = dataclasses.replace(config, backbone=backbone_learner.method,
                                         backbone_config=dataclasses.asdict(backbone_learner.config))
        _check_config(config)
        super().__init__(clip_model, classnames, config, tokenizer)
        if backbone_learner is None:
            backbone_learner = create_learner(config.backbone, clip_model, classnames,
                                              config=dict(config.backbone_config), tokenizer=self.tokenizer)
        elif backbone_learner.clip is not clip_model:
            raise ValueError("backbone_learner must be built on the same clip_model as DPC")
        if config.top_k > len(backbone_learner.classnames):
            raise ValueError(
                f"top_k={config.top_k} is larger than the number of training classes "
                f"({len(backbone_learner.classnames)}); choose top_k <= {len(backbone_learner.classnames)}"
            )
        self.backbone = backbone_learner
        self.backbone.backend = self.backend
        named = dict(self.backbone.named_parameters())
        self.prompt_names = [n for n, p in named.items() if p.requires_grad]
        if not self.prompt_names:
            raise ValueError(f"backbone {config.backbone!r} has no trainable prompt tensors to clone")
        for p in self.backbone.parameters():
            p.requires_grad_(False)  # P: the frozen tuned prompt (and inference head)
        # SPLE_INIT: P' starts equal to P; in official / simple mode the stored M = w_b P + (1 - w_b) P is P too.
        # void: the released learner never loads P into the trained tensor; it starts from the backbone's own
        # initialisation (a fresh backbone of the same config, drawn from the current torch RNG).
        init = named if config.mode != "void" else dict(_fresh_backbone(self.backbone).named_parameters())
        store = nn.ParameterDict({_key(n): nn.Parameter(init[n].detach().clone()) for n in self.prompt_names})
        self.store_name = "mixed" if config.mode in ("official", "simple") else "parallel"
        setattr(self, self.store_name, store)
        self.hooks = _CoOpHooks(self.backbone) if isinstance(self.backbone, CoOp) else _GenericHooks(self.backbone)
        self.rng = random.Random(config.seed)
        self.library = library
        self._transform, self._load_image = transform, load_image
        self.train_classnames = list(self.backbone.classnames)
        self.classnames = list(self.backbone.classnames)
        self.split = "base"
        self._head_cache = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_tuned(cls, source, clip_model=None, classnames: Optional[Sequence[str]] = None, tokenizer=None,
                   library: Optional[ImageLibrary] = None, **config):
        """Stage 2 from a stage-1 result: ``source`` is a directory written by ``save_pretrained`` (loaded
        with ``fastprompt.from_pretrained``) or a learner (its tensors are copied; it is not modified)."""
        if isinstance(source, PromptLearner):
            names = list(classnames) if classnames is not None else list(source.classnames)
            backbone = type(source)(source.clip, names, config=source.config, tokenizer=source.tokenizer)
            backbone.load_trainable_state_dict(source.trainable_state_dict())
        elif isinstance(source, str):
            from fastprompt.learners.pretrained import from_pretrained

            backbone = from_pretrained(source, clip_model=clip_model, classnames=classnames, tokenizer=tokenizer)
        else:
            raise TypeError(f"source must be a learner or a save_pretrained directory, got {type(source).__name__}")
        if isinstance(backbone, DPC):
            raise TypeError("source is already a DPC learner; pass its stage-1 backbone")
        return cls(backbone.clip, backbone.classnames, tokenizer=backbone.tokenizer, backbone_learner=backbone,
                   library=library, **config)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        PromptLearner.backend.fset(self, value)
        backbone = self._modules.get("backbone")
        if backbone is not None:
            backbone.backend = self._backend
        self._head_cache = None

    # ------------------------------------------------------------------ the three prompts
    def tuned_prompts(self) -> Dict[str, torch.Tensor]:
        """P: the backbone's tuned prompt tensors (frozen)."""
        named = dict(self.backbone.named_parameters())
        return {n: named[n] for n in self.prompt_names}

    def parallel_prompts(self) -> Dict[str, torch.Tensor]:
        """The prompt the DHNO loss trains (with autograd): de-mixed P' = (M - (1 - w_b) P) / w_b (official),
        or the trained tensor itself (paper: P'; simple: M; void: V)."""
        store = getattr(self, self.store_name)
        if self.config.mode != "official":
            return {n: store[_key(n)] for n in self.prompt_names}
        P, w = self.tuned_prompts(), self.config.base_weight
        # The released forward: (ctx - (1 - w) * P) * (1 / w), in the tensors' own dtype.
        return {n: (store[_key(n)] - (1 - w) * P[n]) * (1 / w) for n in self.prompt_names}

    def inference_prompts(self, split: Optional[str] = None) -> Dict[str, torch.Tensor]:
        """The prompt used to classify ``split`` ("base" or "new") classes (weighting-decoupling)."""
        split = self.split if split is None else split
        if split not in ("base", "new"):
            raise ValueError(f"split must be 'base' or 'new', got {split!r}")
        P, cfg = self.tuned_prompts(), self.config
        if split == "base":
            if cfg.mode != "paper":  # official: P'; simple: M; void: V (each what the forward uses)
                return self.parallel_prompts()
            Pp, w = self.parallel_prompts(), cfg.base_weight
            return {n: w * Pp[n] + (1 - w) * P[n] for n in self.prompt_names}
        wn = cfg.new_weight
        if cfg.mode == "official":
            # load_model writes w_n M + (1 - w_n) P into ctx; the forward then de-mixes it.
            store, w = getattr(self, self.store_name), cfg.base_weight
            out = {}
            for n in self.prompt_names:
                ctx = wn * store[_key(n)] + (1 - wn) * P[n]
                out[n] = (ctx - (1 - w) * P[n]) * (1 / w)
            return out
        if cfg.mode == "simple":
            # load_model reconstructs P' = (M - (1 - w_b) P) / w_b, mixes w_n P' + (1 - w_n) P, and the simple
            # forward uses that ctx as it is.
            store, w = getattr(self, self.store_name), cfg.base_weight
            return {n: wn * ((store[_key(n)] - (1 - w) * P[n]) * (1 / w)) + (1 - wn) * P[n] for n in self.prompt_names}
        Pp = self.parallel_prompts()  # paper: P'; void: V
        return {n: wn * Pp[n] + (1 - wn) * P[n] for n in self.prompt_names}

    # ------------------------------------------------------------------ classes
    def set_classnames(self, classnames: Sequence[str], split: Optional[str] = None) -> None:
        """Evaluate on other classes. ``split`` defaults to "base" for the training classes and "new"
        otherwise (the official rule for ``new`` and, except ImageNet, ``all``)."""
        self.backbone.set_classnames(classnames)
        self.classnames = list(self.backbone.classnames)
        if split is None:
            split = "base" if self.classnames == self.train_classnames else "new"
        if split not in ("base", "new"):
            raise ValueError(f"split must be 'base' or 'new', got {split!r}")
        self.split = split
        self._text_cache = self._head_cache = None

    def text_features(self, prompts: Dict[str, torch.Tensor], class_idx: Optional[torch.Tensor] = None):
        """[C or n, E] normalised class features for the given prompt tensors (all classes, or ``class_idx``
        [n]). Reference: all classes at 77 tokens, then indexed; fast: only the requested classes."""
        return self.hooks.text_features(prompts, class_idx, self.uses_reference, self.op_backend)

    # ------------------------------------------------------------------ inference
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> logits [B, C] with the current split's prompt."""
        prompts = self.inference_prompts()
        image_features = self.hooks.image_features(images, prompts)
        text = self.cached_text_features(lambda: self.text_features(prompts))
        return self.logit_scale * image_features.to(text.dtype) @ text.t()

    # ------------------------------------------------------------------ DHNO
    # ------------------------------------------------------------------ resume state
    def training_state_dict(self):
        """The miner's random stream (fallback draws, library image choice) carries over epochs: a resumed run
        must continue it, not restart it, to draw the same negatives as an uninterrupted one."""
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss]}

    def load_training_state_dict(self, state) -> None:
        if not isinstance(state, dict) or "rng" not in state:
            raise ValueError(f"DPC training state must hold the miner's 'rng' state, got {type(state).__name__}")
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))

    def attach_train_data(self, dataset, transform: Optional[Callable] = None, load_image: Optional[Callable] = None):
        """Index the few-shot training images of ``dataset`` (a ``DatasetSplits``) per class, once."""
        if len(dataset.classnames) != len(self.train_classnames):
            raise ValueError(
                f"dataset {dataset.name!r} has {len(dataset.classnames)} classes, DPC was built on "
                f"{len(self.train_classnames)}"
            )
        transform = transform or self._transform
        load_image = load_image or self._load_image
        if transform is None:
            size = getattr(self.clip.visual, "image_size", 224)
            transform = default_train_transform(size[0] if isinstance(size, (tuple, list)) else int(size))
        self.library = ImageLibrary.from_dataset(dataset, transform, load_image)

    def set_library(self, library) -> None:
        """An :class:`ImageLibrary`, or in-memory images per class ({label: [N, 3, H, W]})."""
        self.library = library if isinstance(library, ImageLibrary) else ImageLibrary.from_tensors(library)

    def _head_text(self) -> torch.Tensor:
        """[C, E] class features of the frozen head (P). The reference recomputes them every step, as the
        official inference head does; the fast path keeps them (P never changes)."""
        if self.uses_reference:
            return self.text_features(self.tuned_prompts())
        P = self.tuned_prompts()
        key = (self._backend, tuple((p.dtype, p.device, p._version) for p in P.values()), tuple(self.classnames))
        if self._head_cache is None or self._head_cache[0] != key:
            self._head_cache = (key, self.text_features(P))
        return self._head_cache[1]

    @torch.no_grad()
    def build_batch(self, images: torch.Tensor, labels: torch.Tensor) -> DPCBatch:
        """Mine hard negatives for a batch (images [B, 3, H, W], labels [B]) and draw their images."""
        if self.library is None:
            raise RuntimeError("DPC has no hard-negative image library: call attach_train_data(dataset) or set_library()")
        labels = torch.as_tensor(labels, device=images.device).long()
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must be [B={images.shape[0]}], got shape {tuple(labels.shape)}")
        feats = self.hooks.image_features(images, self.tuned_prompts())
        text = self._head_text()
        scores = (100.0 * feats.to(text.dtype) @ text.t()).softmax(dim=-1)
        negatives, drawn = [], []

        def pick(i, negs):  # images right after each sample's mining, as the official loop draws them
            negatives.append(negs)
            drawn.extend(self.library.sample(negs, self.rng))

        mine_hard_negatives(scores, labels, self.config.top_k, self.rng, self.config.fallback, after_sample=pick)
        rows_o, rows_n, lab = [], [], []
        for i, negs in enumerate(negatives):
            rows_o.append(len(lab))
            lab.append(int(labels[i]))
            rows_n.extend(range(len(lab), len(lab) + len(negs)))
            lab.extend(negs)
        dev = images.device
        orig_rows = torch.tensor(rows_o, dtype=torch.long, device=dev)
        neg_rows = torch.tensor(rows_n, dtype=torch.long, device=dev)
        out = images.new_empty((len(lab),) + tuple(images.shape[1:]))
        out[orig_rows] = images
        if drawn:
            neg = torch.stack(drawn)
            if neg.shape[1:] != images.shape[1:]:
                raise ValueError(f"library images are {tuple(neg.shape[1:])}, the batch's {tuple(images.shape[1:])}")
            out[neg_rows] = neg.to(device=dev, dtype=images.dtype)
        return DPCBatch(out, torch.tensor(lab, dtype=torch.long, device=dev), orig_rows, neg_rows, negatives, feats)

    def contrastive_loss(self, batch: DPCBatch):
        """Symmetric InfoNCE over the expanded batch: (loss [], logits [B', B']); column j is the text of
        row j's label under P'."""
        prompts = self.parallel_prompts()
        labels = batch.labels
        if self.uses_reference:
            image_features = self.hooks.image_features(batch.images, prompts)
            text = self.text_features(prompts)[labels]  # the official "feature filtering"
        else:
            if self.hooks.image_uses_prompts:
                image_features = self.hooks.image_features(batch.images, prompts)
            else:  # prompt-free image tower: the head already encoded the originals
                image_features = batch.orig_features.new_empty((labels.shape[0], batch.orig_features.shape[1]))
                image_features[batch.orig_rows] = batch.orig_features
                if batch.neg_rows.numel():
                    image_features[batch.neg_rows] = self.hooks.image_features(batch.images[batch.neg_rows], prompts)
            classes, inverse = torch.unique(labels, return_inverse=True)
            text = self.text_features(prompts, classes)[inverse]
        logits = self.logit_scale * image_features.to(text.dtype) @ text.t()
        target = torch.arange(labels.shape[0], device=logits.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        return loss, logits

    def compute_loss(self, images: torch.Tensor, labels: torch.Tensor):
        """One DPC step (the released code adds no backbone loss): (loss [], logits [B', B'])."""
        return self.contrastive_loss(self.build_batch(images, labels))

    # ------------------------------------------------------------------ state (P travels with P')
    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        out = super().trainable_state_dict()
        out.update({f"tuned.{n}": t.detach() for n, t in self.tuned_prompts().items()})
        return out

    def load_trainable_state_dict(self, tensors: Dict[str, torch.Tensor]) -> None:
        tuned = {k[len("tuned."):]: v for k, v in tensors.items() if k.startswith("tuned.")}
        if sorted(tuned) != sorted(self.prompt_names):
            raise ValueError(f"DPC adapter must hold tuned.{self.prompt_names}, got tuned.{sorted(tuned)}")
        P = self.tuned_prompts()
        with torch.no_grad():
            for n, v in tuned.items():
                if P[n].shape != v.shape:
                    raise ValueError(f"tuned.{n}: stored shape {tuple(v.shape)} != {tuple(P[n].shape)}")
                P[n].copy_(v)
        super().load_trainable_state_dict({k: v for k, v in tensors.items() if not k.startswith("tuned.")})
        self._text_cache = self._head_cache = None


def _fresh_backbone(backbone: PromptLearner) -> PromptLearner:
    """A newly initialised learner of the backbone's method and config (``void`` mode's starting point)."""
    return type(backbone)(backbone.clip, backbone.classnames, config=backbone.config, tokenizer=backbone.tokenizer)


def _key(name: str) -> str:
    return name.replace(".", "__")


def _check_config(config: DPCConfig) -> None:
    if config.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {config.mode!r}")
    if not 0.0 < float(config.base_weight) <= 1.0:
        raise ValueError(f"base_weight (w_b) must be in (0, 1], got {config.base_weight!r}")
    if not 0.0 <= float(config.new_weight) <= 1.0:
        raise ValueError(f"new_weight (w_n) must be in [0, 1], got {config.new_weight!r}")
    if isinstance(config.top_k, bool) or not isinstance(config.top_k, int) or config.top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {config.top_k!r}")
    if config.fallback not in FALLBACK_RANGES:
        raise ValueError(f"fallback must be one of {sorted(FALLBACK_RANGES)}, got {config.fallback!r}")
    if str(config.backbone).lower() == "dpc":
        raise ValueError("DPC cannot be its own backbone")
