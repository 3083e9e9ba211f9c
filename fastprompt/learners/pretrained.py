"""Loading a learner written by ``save_pretrained``."""
from __future__ import annotations

from typing import Optional, Sequence

from fastprompt.backbone import load_clip_reproducible
from fastprompt.learners._common import load_pretrained_tensors, read_pretrained
from fastprompt.learners.adapter_io import check_backbone
from fastprompt.learners.registry import get_learner_class


def from_pretrained(directory: str, clip_model=None, classnames: Optional[Sequence[str]] = None, tokenizer=None,
                    strict_backbone: bool = True, **overrides):
    """Rebuild a learner from ``directory`` (a ``save_pretrained`` folder, or a Hub repository "user/repo").

    Args:
        clip_model: the open_clip model to attach; when None it is rebuilt with ``fastprompt.load_clip`` from
            the architecture and pretrained tag stored at save time.
        classnames: evaluate on other classes (base-to-new); default: the classes it was saved with.
        strict_backbone: refuse a ``clip_model`` whose text tower differs from the one the adapter was trained
            on (False: warn and load anyway).
        **overrides: config options to change (e.g. ``backend="reference"``).
    """
    from fastprompt.hub import resolve  # cycle: fastprompt.hub imports fastprompt.learners

    directory = resolve(directory)  # a Hub repository id ("user/repo") -> its downloaded snapshot
    meta = read_pretrained(directory)
    if clip_model is None:
        if not meta.get("clip_model"):
            raise ValueError(
                f"{directory} does not record which CLIP it was trained on (the model did not come from "
                "fastprompt.load_clip); pass clip_model="
            )
        clip_model, _, tok = load_clip_reproducible(meta["clip_model"], pretrained=meta.get("clip_pretrained"))
        tokenizer = tokenizer or tok
    check_backbone(directory, meta, clip_model, strict=strict_backbone)
    config = dict(meta["config"])
    config.update(overrides)
    cls = get_learner_class(meta["method"])
    learner = cls(clip_model, classnames or meta["classnames"], config=config, tokenizer=tokenizer)
    tensors = load_pretrained_tensors(directory)
    learner.load_trainable_state_dict(tensors)
    return learner
