"""Pieces shared by the deep multimodal prompt learners (MaPLe, IVLP, PromptSRC, DAPT).

These are plain functions and small modules used by composition; each learner still subclasses only
:class:`~fastprompt.learners._common.PromptLearner`.

Text side. The official MaPLe / IVLP / PromptSRC text encoders replace the hidden states of the context
positions ``1 .. n_ctx`` with a learned tensor *before* block i, for i = 1 .. depth-1 (block 0 sees the context
of the prompt itself). MaPLe passes its list of deep prompts with a counter that starts at 0 and is consumed
by every block after the first, so block i gets ``deep[i - 1]``; IVLP / PromptSRC keep one tensor inside each
block i < depth. Both are ``{i: deep[i - 1] for i in 1 .. depth-1}`` here. The fast engine does the replacement
once on the shared prefix (the context is the same for every class), never per class.

Vision side. MaPLe / IVLP / PromptSRC append prompts after the patch tokens before ``ln_pre``; deep ones
overwrite the last ``n`` tokens before block i, with the same counter semantics. DAPT instead inserts shallow
prompts right after CLS, after ``ln_pre`` (``PromptedVisionEncoder(..., after_ln_pre=True)``).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastprompt.classplan import build_class_plan, clean_classnames
from fastprompt.encoders.prompted_text import PromptedTextEncoder
from fastprompt.encoders.prompted_vision import PromptedVisionEncoder
from fastprompt.learners._common import plan_kwargs

__all__ = [
    "official_context_init", "build_text_encoder", "check_class_idx", "deep_text_features", "check_images",
    "visual_width", "vision_encoder", "prompted_image_features", "cosine_logits", "IndependentPrompts",
    "gaussian_epoch_weights", "GaussianPromptAggregation", "DeepTextFeatures",
    "IndependentPromptLearner",
]


# ---------------------------------------------------------------------- text side
def official_context_init(tower, tokenizer, ctx_init: str, n_ctx: int, std: float):
    """The MaPLe / IVLP / PromptSRC context init -> (vectors [M, D], prompt_prefix str).

    With ``ctx_init`` and ``n_ctx <= 4`` the context is the embedding of the phrase's first ``n_ctx`` BPE
    tokens, and the *whole* phrase stays the prompt prefix: n_ctx=2 with "a photo of a" learns "a photo"
    and keeps "of a" as fixed words ("[SOS] c1 c2 of a <name>. [EOT]"). Otherwise N(0, std^2) and "X X ...".
    """
    if n_ctx < 1:
        raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
    emb = tower.token_embedding
    if ctx_init and n_ctx <= 4:
        phrase = ctx_init.replace("_", " ")
        n_tokens = len(tokenizer.encode(phrase))
        if n_tokens < n_ctx:
            raise ValueError(f"ctx_init {ctx_init!r} has {n_tokens} BPE tokens, fewer than n_ctx={n_ctx}")
        ids = torch.as_tensor(tokenizer([phrase]), dtype=torch.long).to(emb.weight.device)
        with torch.no_grad():
            vectors = emb(ids)[0, 1 : 1 + n_ctx].clone()
        return vectors, phrase
    vectors = torch.empty(n_ctx, emb.weight.shape[1], dtype=emb.weight.dtype, device=emb.weight.device)
    nn.init.normal_(vectors, std=std)
    return vectors, " ".join(["X"] * n_ctx)


def build_text_encoder(learner, classnames: Sequence[str], n_ctx: int, prompt_prefix: str):
    """(cleaned names, PromptedTextEncoder) for ``"<prompt_prefix> <name>."`` with the context at positions
    1..n_ctx; a prefix longer than n_ctx keeps its tail as fixed words (the official slicing)."""
    names = clean_classnames(classnames)
    plan = build_class_plan(
        names, learner.tokenizer, n_ctx, prompt_prefix, "end", fixed_prefix_tail=True, **plan_kwargs(learner.tower)
    )
    device = learner.tower.token_embedding.weight.device
    return names, PromptedTextEncoder(learner.clip, plan).to(device)


def check_class_idx(class_idx, num_classes: int, device) -> torch.Tensor:
    """Validate a class subset ``class_idx`` [K] (K >= 1, integers in 0..num_classes-1, repeats allowed) and
    return it as int64 on ``device``."""
    if not isinstance(class_idx, torch.Tensor):
        raise TypeError(f"class_idx must be a 1-D int64 tensor of class indices, got {type(class_idx).__name__}")
    if class_idx.dim() != 1 or class_idx.numel() == 0:
        raise ValueError(f"class_idx must be a non-empty 1-D tensor [K], got shape {tuple(class_idx.shape)}")
    if class_idx.dtype.is_floating_point or class_idx.dtype.is_complex or class_idx.dtype == torch.bool:
        raise TypeError(f"class_idx must hold integer class indices, got dtype {class_idx.dtype}")
    # One host sync per call; the engine syncs anyway (it packs suffixes by their lengths), and an index out of
    # range would otherwise surface as a device-side assert far from the cause.
    lo, hi = int(class_idx.min()), int(class_idx.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"class_idx values must be in 0..{num_classes - 1}, got min {lo}, max {hi}")
    return class_idx.to(device=device, dtype=torch.long)


def deep_text_features(
    learner,
    text: PromptedTextEncoder,
    ctx: torch.Tensor,
    deep: Dict[int, torch.Tensor],
    class_shift: Optional[torch.Tensor] = None,
    class_idx: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Unnormalised class text features [C, E] (or [K, E] for ``class_idx`` [K]) for context ctx [M, D] and
    deep prompts {block i: [M, D]}.

    Reference: the official prompt learner + text encoder, i.e. ``cat([SOS], ctx, suffix)`` for every class at
    full context length, with the deep prompts overwriting positions 1..M before each block i in ``deep``; a
    class subset is taken by indexing those [C, E] features afterwards (what the official code does, e.g.
    DPC's feature filtering). Fast: the engine (shared prefix computed once, deep prompts written into it once,
    packed suffixes) on the requested classes only: the prefix does not depend on the class, so encoding a
    subset is exactly the subset of the full result.
    ``class_shift`` [C, D] (CaPT) is added to every context token of class c at the input; the deep prompts
    still overwrite the context rows of every class at deeper blocks. Classes then no longer share a prefix,
    so the fast engine runs the diagonal pairs (k, class_idx[k]) with shift class_shift[class_idx[k]].
    """
    C, M = text.plan.num_classes, ctx.shape[0]
    if class_shift is not None and (not isinstance(class_shift, torch.Tensor) or class_shift.shape != (C, ctx.shape[1])):
        got = tuple(class_shift.shape) if isinstance(class_shift, torch.Tensor) else type(class_shift).__name__
        raise ValueError(f"class_shift must be a [{C}, {ctx.shape[1]}] tensor (one shift per class), got {got}")
    if class_idx is not None:
        class_idx = check_class_idx(class_idx, C, ctx.device)
    if learner.uses_reference:
        rows = ctx.unsqueeze(0).expand(C, -1, -1)
        if class_shift is not None:
            rows = rows + class_shift.unsqueeze(1)
        prompts = torch.cat([text.token_embeds[:, :1], rows, text.token_embeds[:, 1 + M :]], dim=1)
        feats = text.reference_features(prompts, text.token_ids, deep_prompts=deep or None)
        return feats if class_idx is None else feats[class_idx]
    if class_idx is None:  # every class: a cached static layout
        if class_shift is None:
            return text.fast_pairs(ctx.unsqueeze(0), None, "shared", deep_prompts=deep or None, backend=learner.op_backend)
        return text.fast_pairs(ctx.unsqueeze(0).expand(C, -1, -1), class_shift, "diagonal", deep_prompts=deep or None,
                               backend=learner.op_backend)
    c_idx = class_idx
    K = c_idx.shape[0]
    if class_shift is None:
        g_idx = torch.zeros(K, dtype=torch.long, device=ctx.device)
        return text.fast_features(ctx.unsqueeze(0), None, g_idx, c_idx, deep_prompts=deep or None, backend=learner.op_backend)
    return text.fast_features(
        ctx.unsqueeze(0).expand(K, -1, -1), class_shift[c_idx], torch.arange(K, device=ctx.device), c_idx,
        deep_prompts=deep or None, backend=learner.op_backend,
    )


# ---------------------------------------------------------------------- vision side
def check_images(learner, images: torch.Tensor) -> torch.Tensor:
    """Validate [B, 3, H, W] float images for the model and cast them to the vision tower's dtype."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point (normalised as the model's preprocess does), got {images.dtype}")
    size = getattr(learner.clip.visual, "image_size", None)
    if size is not None:
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        if tuple(images.shape[-2:]) != size:
            raise ValueError(f"images must be [B, 3, {size[0]}, {size[1]}] for this model, got {tuple(images.shape)}")
    return images.to(next(learner.clip.visual.parameters()).dtype)


def visual_width(clip_model) -> int:
    """Hidden width of the ViT image tower (768 for ViT-B/16)."""
    conv = getattr(clip_model.visual, "conv1", None)
    if conv is None:
        raise TypeError(
            f"deep vision prompts need a ViT image tower with conv1 patch embedding, got {type(clip_model.visual).__name__}"
        )
    return int(conv.weight.shape[0])


def vision_encoder(learner):
    """The learner's prompted ViT encoder (prompts appended after the patch tokens, as MaPLe / IVLP /
    PromptSRC do), built on first use and kept outside the module tree: it only views ``learner.clip.visual``."""
    enc = learner.__dict__.get("_prompted_vision")
    if enc is None:
        enc = PromptedVisionEncoder(learner.clip.visual, insert="append")
        object.__setattr__(learner, "_prompted_vision", enc)
    return enc


def prompted_image_features(learner, images: torch.Tensor, prompts: Dict[int, torch.Tensor]) -> torch.Tensor:
    """[B, 3, H, W] -> unnormalised prompted image features [B, E]; ``prompts`` = {block i: [n, Dv]}.

    Reference backend: the official re-concatenating ViT loop; otherwise the fast vision encoder.
    """
    x = check_images(learner, images)
    prompts = {i: p.to(x.dtype) for i, p in prompts.items()}
    return vision_encoder(learner)(x, prompts, fast=not learner.uses_reference)


def cosine_logits(learner, image_features: torch.Tensor, text_normalized: torch.Tensor) -> torch.Tensor:
    """logit_scale * cos(image b, class c): unnormalised image features [B, E] and L2-normalised class text
    features [C, E] -> [B, C]."""
    img = F.normalize(image_features, dim=-1)
    return learner.logit_scale * img.to(text_normalized.dtype) @ text_normalized.t()


# ---------------------------------------------------------------------- shared behaviour as mixins
class DeepTextFeatures:
    """Mixin: ``text_features(class_idx=None)`` of a deep-prompt learner whose ``class_text_features`` takes
    ``class_idx`` (MaPLe, IVLP, PromptSRC)."""

    def text_features(self, class_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[C, E] unnormalised prompted class text features (``class_text_features()``), or [K, E] for the classes
        ``class_idx`` [K] int64 only (DPC's loss needs only the labels of its batch). The reference backend
        encodes every class at 77 tokens and indexes; the fast one encodes just those."""
        if class_idx is None:
            return self.class_text_features()
        return self.class_text_features(class_idx=class_idx)


class IndependentPromptLearner(DeepTextFeatures):
    """Mixin of a learner holding :class:`IndependentPrompts` as ``self.prompts`` (IVLP, PromptSRC)."""

    def class_text_features(
        self, image_features=None, class_shift: Optional[torch.Tensor] = None, class_idx: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """-> [C, E] unnormalised (plug-in hook, ``fastprompt/learners/_family.py``). ``image_features`` is unused
        (not image-conditional); ``class_shift`` [C, Dt] (CaPT) is added to the input context of class c;
        ``class_idx`` [K] restricts the result to those classes ([K, E])."""
        return deep_text_features(
            self, self.text, self.prompts.ctx, self.prompts.text_deep_prompts(), class_shift, class_idx
        )

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Rebuild the class-dependent text buffers (base -> new)."""
        p = self.prompts
        self.classnames, self.text = build_text_encoder(self, classnames, p.n_ctx_text, p.prompt_prefix)
        self._text_cache = None


class IndependentPrompts(nn.Module):
    """IVLP / PromptSRC prompts: independent language and vision prompts, each deep to its own depth.

    Text: ``ctx`` [Mt, Dt] (word-initialised) enters block 0; ``text_deep[i-1]`` [Mt, Dt] replaces the context
    positions before block i, i = 1 .. depth_text-1. Vision: ``vpt`` [Mv, Dv] is appended after the patches
    before ``ln_pre`` (present when depth_vision >= 1); ``vpt_deep[i-1]`` overwrites those tokens before
    block i, i = 1 .. depth_vision-1. Every deep tensor is N(0, std^2), as in the official blocks.
    """

    def __init__(self, learner, n_ctx_text: int, n_ctx_vision: int, ctx_init: str, depth_text: int,
                 depth_vision: int, std: float):
        super().__init__()
        n_text_layers = len(learner.tower.blocks)
        n_vis_layers = len(learner.clip.visual.transformer.resblocks)
        if not 1 <= depth_text <= n_text_layers:
            raise ValueError(f"prompt_depth_text must be in 1..{n_text_layers} (language prompts are required), got {depth_text}")
        if not 0 <= depth_vision <= n_vis_layers:
            raise ValueError(f"prompt_depth_vision must be in 0..{n_vis_layers}, got {depth_vision}")
        if depth_vision >= 1 and n_ctx_vision < 1:
            raise ValueError(f"n_ctx_vision must be >= 1 with vision prompts, got {n_ctx_vision}")
        vectors, self.prompt_prefix = official_context_init(learner.tower, learner.tokenizer, ctx_init, n_ctx_text, std)
        self.n_ctx_text = n_ctx_text
        dt, dv = vectors.shape[1], visual_width(learner.clip)
        kw = {"dtype": vectors.dtype, "device": vectors.device}
        self.ctx = nn.Parameter(vectors)
        self.text_deep = nn.ParameterList(
            [nn.Parameter(nn.init.normal_(torch.empty(n_ctx_text, dt, **kw), std=std)) for _ in range(depth_text - 1)]
        )
        self.vpt = nn.Parameter(nn.init.normal_(torch.empty(n_ctx_vision, dv, **kw), std=std)) if depth_vision else None
        self.vpt_deep = nn.ParameterList(
            [nn.Parameter(nn.init.normal_(torch.empty(n_ctx_vision, dv, **kw), std=std)) for _ in range(max(depth_vision - 1, 0))]
        )

    @classmethod
    def from_config(cls, learner, config) -> "IndependentPrompts":
        """The prompts of an IVLP / PromptSRC config (``n_ctx_text``, ``n_ctx_vision``, ``ctx_init``,
        ``prompt_depth_text``, ``prompt_depth_vision``, ``init_std``)."""
        return cls(
            learner, config.n_ctx_text, config.n_ctx_vision, config.ctx_init, config.prompt_depth_text,
            config.prompt_depth_vision, config.init_std,
        )

    def text_deep_prompts(self) -> Dict[int, torch.Tensor]:
        return {i + 1: p for i, p in enumerate(self.text_deep)}

    def vision_prompts(self) -> Dict[int, torch.Tensor]:
        if self.vpt is None:
            return {}
        return {0: self.vpt, **{i + 1: p for i, p in enumerate(self.vpt_deep)}}


# ---------------------------------------------------------------------- Gaussian prompt aggregation
def gaussian_epoch_weights(mean: float, std: float, max_epoch: int) -> List[float]:
    """PromptSRC's GPA weights: w_e = N(e; mean, std) / sum_e' N(e'; mean, std) for 1-based epochs e."""
    if max_epoch < 1:
        raise ValueError(f"max_epoch must be >= 1, got {max_epoch}")
    if not std > 0:
        raise ValueError(f"GPA std must be > 0, got {std}")
    dens = [math.exp(-0.5 * ((e - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi)) for e in range(1, max_epoch + 1)]
    total = sum(dens)
    if total == 0.0:
        raise ValueError(f"GPA weights underflow: N(e; {mean}, {std}) is 0 for every epoch 1..{max_epoch}")
    return [d / total for d in dens]


class GaussianPromptAggregation:
    """Accumulates sum_e w_e * theta_e over epochs for the *trainable* tensors of a module only.

    The official trainer deep-copies and reweights the entire state dict (frozen fp16 CLIP weights too), which
    costs two CLIP copies and lets rounding drift into the "frozen" backbone; frozen tensors are unchanged by
    training, so restricting GPA to trainable tensors gives the same prompts (DPC's copy of the trainer drops
    the frozen keys as well). Sums are kept in at least float32.
    """

    def __init__(self, mean: float, std: float):
        self.mean, self.std = float(mean), float(std)
        self.sums: Optional[Dict[str, torch.Tensor]] = None
        self.max_epoch: Optional[int] = None

    def reset(self) -> None:
        self.sums, self.max_epoch = None, None

    def update(self, module: nn.Module, epoch: int, max_epoch: int) -> bool:
        """Add epoch ``epoch`` (0-based) with weight w_{epoch+1}; after the last epoch, load the aggregate
        into the module's trainable tensors and return True."""
        if self.max_epoch is None or epoch == 0:
            self.sums, self.max_epoch = None, int(max_epoch)
        if max_epoch != self.max_epoch:
            raise ValueError(f"max_epoch changed during training: {self.max_epoch} -> {max_epoch}")
        if not 0 <= epoch < max_epoch:
            raise ValueError(f"epoch must be in 0..{max_epoch - 1}, got {epoch}")
        w = gaussian_epoch_weights(self.mean, self.std, max_epoch)[epoch]
        params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        with torch.no_grad():
            if self.sums is None:
                self.sums = {n: torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for n, p in params.items()}
            for n, p in params.items():
                self.sums[n].add_(p.detach().to(self.sums[n].dtype), alpha=w)
            if epoch == max_epoch - 1:
                for n, p in params.items():
                    p.copy_(self.sums[n].to(p.dtype))
                self.reset()
                return True
        return False
