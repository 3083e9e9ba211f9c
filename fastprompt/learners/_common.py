"""Helpers every learner shares: the learner backends, adapter files (save/load), context initialisation.

The learner base class itself is :class:`fastprompt.learners.base.PromptLearner`.
"""
from __future__ import annotations

from typing import Any, Dict

import torch
import torch.nn as nn
from open_clip.tokenizer import SimpleTokenizer

from fastprompt.backbone import TextTower
from fastprompt.learners.adapter_io import (  # noqa: F401 - write_adapter and the file names are re-exported
    CONFIG_FILE, WEIGHTS_FILE, backbone_identity, read_adapter_meta, read_adapter_tensors, write_adapter,
)
from fastprompt.ops._dispatch import BACKENDS
from fastprompt.validation import check_ctx_init


# Learner backends: "reference" runs the official 77-token computation; every other value runs the fast
# engine, with its ops on that backend ("torch" = the fast engine on eager torch ops).
LEARNER_BACKENDS = ("reference", "torch") + tuple(b for b in BACKENDS if b != "reference")


def default_tokenizer(tower: TextTower):
    """open_clip's SimpleTokenizer at the tower's context length."""
    return SimpleTokenizer(context_length=tower.context_length)


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
    """The tensors of the adapter in ``directory`` ({name: tensor} on the CPU)."""
    return read_adapter_tensors(directory)


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


def __getattr__(name: str):
    # ``PromptLearner`` moved to fastprompt.learners.base (which imports this module); old imports keep working.
    if name == "PromptLearner":
        from fastprompt.learners.base import PromptLearner  # cycle: fastprompt.learners.base imports this module

        return PromptLearner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
