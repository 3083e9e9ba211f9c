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

PromptKD backbone (the released ``sple_promptkd.py``; ``docs/methods/dpc.md``): the DPC prompts are the student's ``vpt`` /
``vpt_deep.*`` / ``projector.*`` and the frozen teacher's text prompts (``teacher.prompts.ctx`` /
``text_deep.*``); only the text ctx is de-mixed (official). ``official`` starts ``vpt_deep.*`` and
``text_deep.*`` from N(0, 0.02) (the released list re-assignment does not load them; seeded with ``seed``),
``paper`` clones everything. The teacher scores the batch (the released trainer's first step: its image and text features). The DPC
model keeps its own projector BatchNorm statistics (``bn_stats``, updated by the loss in train mode). Base:
logit_scale * (student(P') + projector) . (teacher text tower with P')^T; new: the w_n-mixed student (the
head's BN statistics) against the teacher's frozen text features. Modes simple / void are not offered.

Backbone hooks: a CoOp backbone is driven directly; any other learner must expose
``image_features(images) -> [B, E]`` and ``text_features(class_idx=None) -> [C or n, E]`` (optionally
``image_features_use_prompts = False``); its prompt tensors (its trainable parameters) are substituted with
``torch.func.functional_call`` for each call.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastprompt.learners._common import read_pretrained
from fastprompt.learners._dpc_hooks import make_hooks
from fastprompt.learners._family import forwarding_backend
from fastprompt.learners._hard_negatives import FALLBACK_RANGES, ImageLibrary, mine_hard_negatives
from fastprompt.learners.base import LearnerConfig, PromptLearner
from fastprompt.learners.pretrained import from_pretrained
from fastprompt.learners.promptkd import PromptKD
from fastprompt.learners.registry import create_learner, register_learner

MODES = ("official", "paper", "simple", "void")


@dataclass
class DPCConfig(LearnerConfig):
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
    # random fallback range: "coop" (1..C-2) or "promptkd" (1..C-1); None = the backbone's released trainer
    # (sple_promptkd.py for a PromptKD backbone, sple_coop.py otherwise)
    fallback: Optional[str] = None
    seed: Optional[int] = None  # seed of the sampler's random source (fallback draws, image choice)


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


class _Buffers(nn.Module):
    """DPC's own copy of the projector's BatchNorm buffers (the released DPC model has its own projector)."""

    def __init__(self, tensors: Dict[str, torch.Tensor]):
        super().__init__()
        for k, v in tensors.items():
            self.register_buffer(k, v.detach().clone())


@register_learner("dpc")
class DPC(PromptLearner):
    """DPC over a tuned backbone. ``forward(images) -> logits [B, C]`` with the prompt of the current split;
    ``compute_loss(images, labels) -> (DHNO loss, contrastive logits [B', B'])``. Trainable: ``mixed.*``
    (official, simple) or ``parallel.*`` (paper, void), one tensor per backbone prompt tensor."""

    method = "dpc"
    config_class = DPCConfig
    training_defaults = {"epochs": 20, "batch_size": 4, "lr": 0.002}
    tiny_setup = {"top_k": 2, "seed": 0, "backbone_config": {"n_ctx": 2}}
    tiny_needs_data = True  # the hard-negative image library

    @classmethod
    def bench_setup(cls, classnames, dataset="imagenet", tasks=2):
        return list(classnames), {"top_k": min(8, len(classnames) - 1)}  # the official K, bounded by the classes

    def bench_prepare(self, generator: torch.Generator) -> None:
        """Two in-memory images per class, drawn on the CPU as a loader would deliver them."""
        size = self.clip.visual.image_size
        px = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.set_library({c: torch.randn(2, 3, px, px, generator=generator) for c in range(len(self.classnames))})

    def __init__(self, clip_model: nn.Module, classnames: Sequence[str], config=None, tokenizer=None,
                 backbone_learner: Optional[PromptLearner] = None, library: Optional[ImageLibrary] = None,
                 transform: Optional[Callable] = None, load_image: Optional[Callable] = None, **kwargs):
        config = DPCConfig.build(config, kwargs)
        if backbone_learner is not None:
            config = dataclasses.replace(config, backbone=backbone_learner.method,
                                         backbone_config=dataclasses.asdict(backbone_learner.config))
        if config.fallback is None:
            config = dataclasses.replace(config, fallback="promptkd" if config.backbone == "promptkd" else "coop")
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
        self.hooks = make_hooks(self.backbone)  # before freezing: PromptKD's hooks read requires_grad
        self.prompt_names = list(getattr(self.hooks, "prompt_names", None)
                                 or [n for n, p in named.items() if p.requires_grad])
        if not self.prompt_names:
            raise ValueError(f"backbone {config.backbone!r} has no trainable prompt tensors to clone")
        # the tensors the official forward de-mixes (PromptKD: the text ctx only; otherwise all of them)
        self.demix_names = list(getattr(self.hooks, "demix_names", self.prompt_names))
        for p in self.backbone.parameters():
            p.requires_grad_(False)  # P: the frozen tuned prompt (and inference head)
        # SPLE_INIT: P' starts equal to P; in official / simple mode the stored M = w_b P + (1 - w_b) P is P too.
        # void: the released learner never loads P into the trained tensor; it starts from the backbone's own
        # initialisation (a fresh backbone of the same config, drawn from the current torch RNG).
        if config.mode not in self.hooks.modes:
            raise ValueError(f"DPC over {config.backbone} supports mode {' or '.join(map(repr, self.hooks.modes))}, "
                             f"got {config.mode!r}")
        init = self.hooks.initial_prompts(config.mode, config.seed)
        store = nn.ParameterDict({_key(n): nn.Parameter(init[n].detach().clone()) for n in self.prompt_names})
        self.store_name = "mixed" if config.mode in ("official", "simple") else "parallel"
        setattr(self, self.store_name, store)
        # PromptKD: the DPC model's projector keeps its own BatchNorm statistics (loaded from the backbone)
        bn = {_key(n): b for n, b in self.backbone.named_buffers() if n in getattr(self.hooks, "buffer_names", ())}
        self.bn_stats = _Buffers(bn) if bn else None
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
                   library: Optional[ImageLibrary] = None, teacher_clip: Optional[nn.Module] = None, **config):
        """Stage 2 from a stage-1 result: ``source`` is a directory written by ``save_pretrained`` (loaded
        with ``fastprompt.from_pretrained``) or a learner (its tensors are copied; it is not modified).
        ``teacher_clip``: a saved PromptKD's teacher CLIP when it cannot be rebuilt by name."""
        if isinstance(source, PromptLearner):
            names = list(classnames) if classnames is not None else list(source.classnames)
            extra = {}
            if isinstance(source, PromptKD):  # rebuild the teacher on the same CLIP; its tensors load below
                extra = {"teacher_clip": source.teacher.clip, "teacher_tokenizer": source.teacher.tokenizer}
            backbone = type(source)(source.clip, names, config=source.config, tokenizer=source.tokenizer, **extra)
            backbone.load_trainable_state_dict(source.trainable_state_dict())
        elif isinstance(source, str):
            if teacher_clip is not None and read_pretrained(source).get("method") == PromptKD.method:
                backbone = PromptKD.from_pretrained(source, clip_model, teacher_clip=teacher_clip,
                                                    classnames=classnames, tokenizer=tokenizer)
            else:
                backbone = from_pretrained(source, clip_model=clip_model, classnames=classnames, tokenizer=tokenizer)
        else:
            raise TypeError(f"source must be a learner or a save_pretrained directory, got {type(source).__name__}")
        if isinstance(backbone, DPC):
            raise TypeError("source is already a DPC learner; pass its stage-1 backbone")
        return cls(backbone.clip, backbone.classnames, tokenizer=backbone.tokenizer, backbone_learner=backbone,
                   library=library, **config)

    backend = forwarding_backend("backbone", clear=("_head_cache",))

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
        # The released forward: (ctx - (1 - w) * P) * (1 / w), in the tensors' own dtype (de-mixed tensors only).
        return {n: (store[_key(n)] - (1 - w) * P[n]) * (1 / w) if n in self.demix_names else store[_key(n)]
                for n in self.prompt_names}

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
            return {n: w * Pp[n] + (1 - w) * P[n] if n in self.demix_names else Pp[n] for n in self.prompt_names}
        wn = cfg.new_weight
        if cfg.mode == "official":
            # load_model writes w_n M + (1 - w_n) P into ctx; the forward then de-mixes it.
            store, w = getattr(self, self.store_name), cfg.base_weight
            out = {}
            for n in self.prompt_names:
                ctx = wn * store[_key(n)] + (1 - wn) * P[n]
                out[n] = (ctx - (1 - w) * P[n]) * (1 / w) if n in self.demix_names else ctx
            return out
        if cfg.mode == "simple":
            # load_model reconstructs P' = (M - (1 - w_b) P) / w_b, mixes w_n P' + (1 - w_n) P, and the simple
            # forward uses that ctx as it is.
            store, w = getattr(self, self.store_name), cfg.base_weight
            return {n: wn * ((store[_key(n)] - (1 - w) * P[n]) * (1 / w)) + (1 - wn) * P[n] for n in self.prompt_names}
        Pp = self.parallel_prompts()  # paper: P'; void: V
        return {n: wn * Pp[n] + (1 - wn) * P[n] for n in self.prompt_names}

    def bn_buffers(self) -> Dict[str, torch.Tensor]:
        """{backbone buffer name: tensor}: the DPC model's own BatchNorm statistics (PromptKD's projector),
        substituted into the student on the DPC forward; {} for backbones without them."""
        if self.bn_stats is None:
            return {}
        return {n.replace("__", "."): b for n, b in self.bn_stats.named_buffers()}

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
        if hasattr(self.hooks, "logits"):  # PromptKD: split-specific heads (the released evaluation)
            return self.hooks.logits(self, images, self.split)
        if self.image_features_frozen:
            return self.logits_from_image_features(self.backbone.encode_images(images))
        prompts = self.inference_prompts()
        image_features = self.hooks.image_features(images, prompts)
        text = self.cached_text_features(lambda: self.text_features(prompts))
        return self.logit_scale * image_features.to(text.dtype) @ text.t()

    @property
    def image_features_frozen(self) -> bool:
        """True over CoOp: the image side is the backbone's frozen, unprompted encoder (feature store)."""
        return self.hooks.image_features_frozen

    def logits_from_image_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """[B, E] as ``encode_images`` returns them -> logits [B, C] (over CoOp only: ``forward``'s rest)."""
        if not self.image_features_frozen:
            raise TypeError(f"DPC over {self.config.backbone} prompts its image side; it needs the images")
        prompts = self.inference_prompts()
        image_features = F.normalize(image_features, dim=-1)  # what the CoOp hooks' image_features returns
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
            transform = self.hooks.library_transform(self.clip)
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
        if hasattr(self.hooks, "score_features"):  # PromptKD: the teacher scores (the released trainer's first step)
            feats, text = self.hooks.score_features(images)
        else:
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
        image_prompts = {**prompts, **self.bn_buffers()}  # PromptKD: the DPC projector's BN statistics
        if self.uses_reference:
            image_features = self.hooks.image_features(batch.images, image_prompts)
            text = self.text_features(prompts)[labels]  # the official "feature filtering"
        else:
            if self.hooks.image_uses_prompts:
                image_features = self.hooks.image_features(batch.images, image_prompts)
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
        """``mixed.*`` / ``parallel.*``, P as ``tuned.*``; PromptKD also: the rest of the backbone's adapter
        (``head.*``: teacher image prompts, the head's BN statistics) and DPC's own BN statistics (``buffers.*``)."""
        out = super().trainable_state_dict()
        out.update({f"tuned.{n}": t.detach() for n, t in self.tuned_prompts().items()})
        out.update(self.hooks.extra_state(self))
        return out

    def load_trainable_state_dict(self, tensors: Dict[str, torch.Tensor]) -> None:
        tuned = {k[len("tuned."):]: v for k, v in tensors.items() if k.startswith("tuned.")}
        if sorted(tuned) != sorted(self.prompt_names):
            raise ValueError(f"DPC adapter must hold tuned.{self.prompt_names}, got tuned.{sorted(tuned)}")
        P = self.tuned_prompts()
        for n, v in tuned.items():
            if P[n].shape != v.shape:
                raise ValueError(f"tuned.{n}: stored shape {tuple(v.shape)} != {tuple(P[n].shape)}")
        self.hooks.load_state(self, tensors, tuned)
        super().load_trainable_state_dict(
            {k: v for k, v in tensors.items() if not k.startswith(("tuned.", "head.", "buffers."))})
        self._text_cache = self._head_cache = None


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
