"""Official checkpoints in and out: ``load_official``, ``export_official``, ``convert``."""
from __future__ import annotations

import os
from typing import Dict, Mapping, Optional, Sequence, Union

import torch

from fastprompt.backbone import load_clip
from fastprompt.learners.dpc import DPC
from fastprompt.learners.registry import create_learner
from fastprompt.official.checkpoint import OfficialCheckpoint, read_official, write_dassl
from fastprompt.official.names import is_frozen_key, layout_for, official_names


def _detect_prefix(state: Mapping[str, torch.Tensor], wanted: Sequence[str], candidates: Sequence[str]) -> str:
    """The prefix p (from ``candidates``) for which the most keys k of ``state`` give a wanted name p + k:
    a checkpoint's keys are either whole-model (p = "") or relative to a sub-module ("prompt_learner.")."""
    wanted = set(wanted)
    best, best_hits = "", -1
    for p in candidates:
        hits = sum((p + k) in wanted for k in state)
        if hits > best_hits:
            best, best_hits = p, hits
    return best


def official_state_to_tensors(learner, checkpoint: OfficialCheckpoint) -> Dict[str, torch.Tensor]:
    """Official state dict(s) -> {fastprompt trainable name: tensor in the learner's dtype and layout}.

    Frozen entries (token prefix/suffix, CLIP tower weights, zero-shot copies) are dropped; a key that is neither
    a learned tensor of this method nor frozen, a missing learned tensor, or a wrong shape is a ValueError naming it.
    """
    method = learner.method
    names = official_names(learner)  # fastprompt -> (official, transposed)
    by_official = {off: (fp, t) for fp, (off, t) in names.items()}
    layout = layout_for(method)
    candidates = ["", *sorted({p for p in layout.models.values() if p}), "prompt_learner.",
                  "learnable_params.prompt_learner.", "learnable_params."]
    merged: Dict[str, torch.Tensor] = {}
    for prefix, state in checkpoint.parts:
        if prefix is None:
            prefix = _detect_prefix(state, by_official, candidates)
        for key, value in state.items():
            full = prefix + key
            if full in by_official:
                merged[full] = value
            elif not (is_frozen_key(full) or is_frozen_key(key)):
                raise ValueError(
                    f"official {method} checkpoint has an unknown key {full!r} (neither a learned tensor of {method} "
                    f"nor a frozen buffer); expected keys: {sorted(by_official)}"
                )
    missing = sorted(set(by_official) - set(merged))
    if missing:
        raise ValueError(f"official {method} checkpoint lacks {missing} (found: {sorted(merged) or 'no learned key'})")
    own = dict(learner.named_parameters())
    out = {}
    for off, value in merged.items():
        fp, transposed = by_official[off]
        target = own[fp]
        value = value.t() if transposed else value
        if tuple(value.shape) != tuple(target.shape):
            shown = tuple(value.t().shape) if transposed else tuple(value.shape)
            raise ValueError(
                f"official key {off!r}: shape {shown} does not fit {method}'s {fp!r} "
                f"{tuple(target.shape)}{' (stored transposed)' if transposed else ''}; check the learner options "
                "(n_ctx, prompt depth, class list, ...)"
            )
        out[fp] = value.to(dtype=target.dtype)  # e.g. an fp16 official checkpoint into an fp32 learner
    if method == "dpc":  # the frozen stage-1 prompt P, already loaded into the backbone from its own checkpoint
        out.update({f"tuned.{n}": t.detach() for n, t in learner.tuned_prompts().items()})
    return out


def _build_clip(clip_model):
    if isinstance(clip_model, str):
        model, _, tokenizer = load_clip(clip_model, pretrained="openai")
        return model, tokenizer
    if clip_model is None:
        raise ValueError("clip_model= is required: an open_clip model or an architecture name such as 'ViT-B-16'")
    return clip_model, None


def load_official(method: str, checkpoint: Union[str, os.PathLike, Mapping], clip_model=None,
                  classnames: Optional[Sequence] = None, epoch: Optional[int] = None, tokenizer=None,
                  trust_checkpoint: bool = False, backbone_checkpoint=None, verbose: bool = True, **config):
    """A fastprompt learner holding the tensors of an official checkpoint.

    Args:
        method: the fastprompt method ("coop", "cocoop", "kgcoop", "prograd", "maple", "ivlp", "promptsrc",
            "dept", "capt", "softcpt", "dpc").
        checkpoint: a Dassl checkpoint file (``{"state_dict", "epoch", ...}``), a Dassl output directory
            (``<model name>/model.pth.tar-<N>`` or ``model-best.pth.tar``; the highest N unless ``epoch``), a
            plain state dict, or a path to one. Keys may be whole-model (``prompt_learner.ctx``) or relative to
            the prompt learner (``ctx``).
        clip_model: the open_clip CLIP (or an architecture name, loaded with OpenAI weights).
        classnames: the class names the checkpoint was trained on (official checkpoints do not store them).
        backbone_checkpoint: DPC only: the stage-1 backbone's official checkpoint.
        **config: the learner's options (must match the checkpoint's shapes, e.g. ``n_ctx``, ``prompt_depth``).

    Returns:
        the learner (``forward(images [B, 3, H, W]) -> logits [B, C]``).
    """
    if classnames is None:
        raise ValueError("classnames= is required: official checkpoints do not store the class names")
    clip, tok = _build_clip(clip_model)
    tokenizer = tokenizer or tok
    if method == "dpc":
        if backbone_checkpoint is None:
            raise ValueError("DPC needs backbone_checkpoint= (the stage-1 official checkpoint of its backbone)")
        backbone_name = config.pop("backbone", "coop")
        backbone = load_official(backbone_name, backbone_checkpoint, clip, classnames, tokenizer=tokenizer,
                                 trust_checkpoint=trust_checkpoint, verbose=verbose,
                                 **dict(config.pop("backbone_config", {})))
        learner = DPC(clip, classnames, tokenizer=tokenizer, backbone_learner=backbone, **config)
    else:
        learner = create_learner(method, clip, classnames, tokenizer=tokenizer, **config)
    ck = read_official(checkpoint, layout_for(method).models, epoch=epoch, trust=trust_checkpoint)
    if verbose and ck.files:
        print(f"[fastprompt] {method}: loading {', '.join(ck.files)} (epoch {ck.epoch})")
    learner.load_trainable_state_dict(official_state_to_tensors(learner, ck))
    return learner


def official_state_dict(learner, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """{official whole-model key: tensor} of the learner's learned tensors (transposed where the official code
    stores them so); ``dtype`` casts them (e.g. torch.float16 for the official fp16 models)."""
    names = official_names(learner)
    own = dict(learner.named_parameters())
    out = {}
    for fp, (off, transposed) in names.items():
        value = own[fp].detach()
        value = value.t() if transposed else value
        out[off] = value.to(dtype) if dtype is not None else value
    return out


def export_official(learner, path: Union[str, os.PathLike], epoch: int = 1, dtype: Optional[torch.dtype] = None,
                    layout: str = "dassl-dir") -> list:
    """Write ``learner``'s tensors as the official code loads them; returns the files written.

    layout "dassl-dir": ``path`` is a Dassl output directory; one ``<model name>/model.pth.tar-<epoch>`` per
    model the official trainer registers (keys relative to that model, as Dassl saves them), so the official
    ``--model-dir path --load-epoch <epoch>`` loads it. layout "file": one Dassl checkpoint file with
    whole-model keys (what ``load_official`` and ``torch.load`` + ``load_state_dict(strict=False)`` read).
    """
    state = official_state_dict(learner, dtype)
    path = os.fspath(path)
    if layout == "file":
        write_dassl(path, state, epoch)
        return [path]
    if layout != "dassl-dir":
        raise ValueError(f"layout must be 'dassl-dir' or 'file', got {layout!r}")
    models = layout_for(learner.method).models
    if learner.method in ("dept", "dpc"):  # the model name follows the base (DePT over MaPLe, DPC over ...)
        base = getattr(learner, "base", None) or getattr(learner, "backbone", None)
        models = ({"MultiModalPromptLearner": ""} if base.method == "maple" else
                  {"VLPromptLearner": ""} if base.method in ("ivlp", "promptsrc") else
                  ({"PromptLearner": ""} if learner.method == "dept" else {"prompt_learner": "prompt_learner."}))
    written, left = [], dict(state)
    prefixed = sorted(((n, p) for n, p in models.items() if p), key=lambda x: -len(x[1]))
    for name, prefix in prefixed:
        part = {k[len(prefix):]: left.pop(k) for k in list(left) if k.startswith(prefix)}
        if part:
            out = os.path.join(path, name, f"model.pth.tar-{epoch}")
            write_dassl(out, part, epoch)
            written.append(out)
    if left:
        whole = [n for n, p in models.items() if not p]
        if not whole:
            raise ValueError(f"{learner.method}: keys {sorted(left)} fit none of the official models {sorted(models)}")
        out = os.path.join(path, whole[0], f"model.pth.tar-{epoch}")
        write_dassl(out, left, epoch)
        written.append(out)
    return written


def convert(method: str, checkpoint, output_dir: str, clip_model=None, classnames=None, **kwargs):
    """Official checkpoint -> a fastprompt adapter directory (``save_pretrained``); returns the learner."""
    learner = load_official(method, checkpoint, clip_model=clip_model, classnames=classnames, **kwargs)
    learner.save_pretrained(output_dir)
    return learner
