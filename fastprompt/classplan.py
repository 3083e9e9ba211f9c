"""Class plans: the tokenised class prompts and where the learnable context sits in each of them.

A plan is built once per class list. It holds, per class, the official 77-token ids (for the reference path
and the EOT index) and a position map for the fast path: ``slot[c, t]`` is the context index at position t
(or -1), ``src[c, t]`` the token id whose frozen embedding sits there otherwise. ``prefix_len`` is the length
of the prefix shared by every class (SOS + context for the default "end" position).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from fastprompt.validation import check_unique_classnames

__all__ = ["ClassPlan", "build_class_plan", "clean_classnames", "CLASS_POSITIONS"]

CLASS_POSITIONS = ("end", "middle", "front")


def clean_classnames(classnames: Sequence[str]) -> List[str]:
    """Validate a class list and replace ``_`` with spaces, as the official code does. Names that are equal
    after that (ignoring case and extra spaces) are an error (:func:`fastprompt.validation.check_unique_classnames`)."""
    if isinstance(classnames, str) or not isinstance(classnames, Sequence):
        raise TypeError(f"classnames must be a list of strings, got {type(classnames).__name__}")
    if len(classnames) == 0:
        raise ValueError("classnames is empty: a learner needs at least one class")
    cleaned = []
    for i, name in enumerate(classnames):
        if not isinstance(name, str):
            raise TypeError(f"class {i} is a {type(name).__name__}, not a string: {name!r}")
        name = name.replace("_", " ").strip()
        if not name:
            raise ValueError(f"class {i} has an empty name")
        cleaned.append(name)
    check_unique_classnames(cleaned)
    return cleaned


@dataclass
class ClassPlan:
    classnames: List[str]
    n_ctx: int
    position: str
    token_ids: torch.Tensor  # [C, context_length] int64: official ids of "<prefix> <name>."
    eot: torch.Tensor  # [C] int64: EOT index per class
    name_lens: List[int]  # BPE tokens of each name alone (the official slicing length)
    slot: torch.Tensor  # [C, context_length] int64: context index at each position, -1 for a fixed token
    src: torch.Tensor  # [C, context_length] int64: token id at each fixed position (0 at context slots)
    prefix_len: int  # positions shared by every class

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def max_len(self) -> int:
        """Truncated sequence length: the longest prompt's EOT index + 1."""
        return int(self.eot.max()) + 1


def _encode(tokenizer, text: str) -> List[int]:
    if not hasattr(tokenizer, "encode"):
        raise TypeError(
            f"tokenizer {type(tokenizer).__name__} has no .encode(); pass an open_clip SimpleTokenizer "
            "(open_clip.get_tokenizer(name))"
        )
    return list(tokenizer.encode(text))


def build_class_plan(
    classnames: Sequence[str],
    tokenizer,
    n_ctx: int,
    prompt_prefix: Optional[str] = None,
    position: str = "end",
    context_length: int = 77,
    pool_type: str = "argmax",
    eos_id: Optional[int] = None,
    fixed_prefix_tail: bool = False,
) -> ClassPlan:
    """Tokenise ``"<prompt_prefix> <name>."`` for every class and map where the context goes.

    Args:
        classnames: C class names (``_`` becomes a space).
        tokenizer: an open_clip ``SimpleTokenizer`` (callable -> [C, context_length] ids, and ``.encode``).
        n_ctx: M, the number of context tokens.
        prompt_prefix: the words standing in for the context ("X X X X" by default, or an init phrase of
            exactly M words, one BPE token each).
        position: where the class name goes: "end", "middle" or "front".
        context_length: the tower's context length (77 for CLIP).
        fixed_prefix_tail: allow a ``prompt_prefix`` of more than ``n_ctx`` BPE tokens (position "end" only):
            its first ``n_ctx`` tokens are the context slots and the rest stay fixed words before the class
            name. MaPLe / IVLP / PromptSRC do this: n_ctx=2 initialised from "a photo of a" gives
            ``[SOS] c1 c2 of a <name>. [EOT]``, because the official code slices the suffix at ``1 + n_ctx``.
    """
    if position not in CLASS_POSITIONS:
        raise ValueError(f"class_token_position must be one of {CLASS_POSITIONS}, got {position!r}")
    if n_ctx < 1:
        raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
    names = clean_classnames(classnames)
    if prompt_prefix is None:
        prompt_prefix = " ".join(["X"] * n_ctx)
    n_prefix = len(_encode(tokenizer, prompt_prefix))
    if fixed_prefix_tail and n_prefix > n_ctx and position != "end":
        raise ValueError(
            f"a context phrase longer than n_ctx ({prompt_prefix!r}: {n_prefix} tokens, n_ctx={n_ctx}) needs "
            f"class_token_position='end', got {position!r}"
        )
    if n_prefix < n_ctx or (n_prefix > n_ctx and not fixed_prefix_tail):
        raise ValueError(
            f"the context phrase {prompt_prefix!r} is {len(_encode(tokenizer, prompt_prefix))} BPE tokens, "
            f"not n_ctx={n_ctx}; use words that are one token each"
        )
    prompts = [f"{prompt_prefix} {name}." for name in names]
    for name, prompt in zip(names, prompts):
        n_tokens = len(_encode(tokenizer, prompt)) + 2  # + SOS and EOT
        if n_tokens > context_length:
            raise ValueError(
                f"class {name!r} does not fit: its prompt needs {n_tokens} tokens with n_ctx={n_ctx}, "
                f"but the text tower's context length is {context_length}"
            )
    token_ids = tokenizer(prompts, context_length=context_length) if _takes_length(tokenizer) else tokenizer(prompts)
    token_ids = torch.as_tensor(token_ids, dtype=torch.long)
    if token_ids.shape != (len(names), context_length):
        raise ValueError(f"tokenizer returned {tuple(token_ids.shape)}, expected {(len(names), context_length)}")
    if pool_type == "eos":
        if eos_id is None:
            raise ValueError("pool_type 'eos' needs the tokenizer's eos id")
        eot = (token_ids == eos_id).int().argmax(dim=-1)
    else:
        eot = token_ids.argmax(dim=-1)
    name_lens = [len(_encode(tokenizer, name)) for name in names]

    C, T, M = len(names), context_length, n_ctx
    slot = torch.full((C, T), -1, dtype=torch.long)
    src = token_ids.clone()
    for c in range(C):
        ids, nl = token_ids[c], name_lens[c]
        # Same permutation of the "end" tokens as the official per-class loops; total length (and EOT) unchanged.
        if position == "end":
            order = [("id", 0)] + [("ctx", k) for k in range(M)] + [("id", t) for t in range(1 + M, T)]
        elif position == "middle":
            half = M // 2
            order = (
                [("id", 0)]
                + [("ctx", k) for k in range(half)]
                + [("id", t) for t in range(1 + M, 1 + M + nl)]
                + [("ctx", k) for k in range(half, M)]
                + [("id", t) for t in range(1 + M + nl, T)]
            )
        else:  # front
            order = (
                [("id", 0)]
                + [("id", t) for t in range(1 + M, 1 + M + nl)]
                + [("ctx", k) for k in range(M)]
                + [("id", t) for t in range(1 + M + nl, T)]
            )
        for t, (kind, value) in enumerate(order[:T]):
            if kind == "ctx":
                slot[c, t], src[c, t] = value, 0
            else:
                src[c, t] = ids[value]

    # Longest prefix on which every class agrees; capped so that each suffix keeps at least its EOT.
    key = torch.where(slot >= 0, -(slot + 1), src)
    same = (key == key[:1]).all(dim=0)
    prefix_len = int(eot.min())
    for t in range(prefix_len):
        if not bool(same[t]):
            prefix_len = t
            break
    return ClassPlan(names, M, position, token_ids, eot, name_lens, slot, src, prefix_len)


def _takes_length(tokenizer) -> bool:
    try:
        return "context_length" in inspect.signature(tokenizer.__call__).parameters
    except (TypeError, ValueError):
        return False
