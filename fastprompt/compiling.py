"""``fastprompt.compile``: the fast text side of a learner through ``torch.compile``.

The engine's layouts are static (built on the host per class list and batch size) and nothing in the fast
text path reads device values back, so it traces as one graph (``fullgraph=True``) with static shapes. On CUDA
the default mode is "reduce-overhead" (CUDA graphs: one replay per step instead of hundreds of launches); on
the CPU inductor's default mode. Only the fast path compiles; a learner on the "reference" backend is left as
it is.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch.nn as nn

from fastprompt.encoders.prompted_text import PromptedTextEncoder

__all__ = ["compile_learner", "compile_options"]

_MODES = (None, "auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_options(value: Union[bool, str, Dict[str, Any], None]) -> Optional[Dict[str, Any]]:
    """Normalise a ``compile=`` argument: False / None -> None (eager); True -> {"mode": "auto"}; a mode
    string -> {"mode": it}; a dict -> keyword arguments of ``torch.compile`` (``backend``, ``mode``, ``options``)."""
    if value is None or value is False:
        return None
    if value is True:
        return {"mode": "auto"}
    if isinstance(value, str):
        value = {"mode": value}
    if not isinstance(value, dict):
        raise TypeError(f"compile must be a bool, a torch.compile mode or a dict of torch.compile options, got {type(value).__name__}")
    unknown = set(value) - {"backend", "mode", "options"}
    if unknown:
        raise ValueError(f"compile: unknown option(s) {sorted(unknown)}; allowed: backend, mode, options")
    if value.get("mode") not in _MODES:
        raise ValueError(f"compile: unknown mode {value.get('mode')!r}; choose one of {', '.join(map(str, _MODES[1:]))}")
    return dict(value)


def compile_learner(learner: nn.Module, compile: Union[bool, str, Dict[str, Any]] = True) -> nn.Module:
    """Compile the fast text side of ``learner`` (and of every learner it wraps) in place; returns it.

    Args:
        learner: a PromptLearner.
        compile: True (mode "auto": CUDA graphs on CUDA, inductor's default elsewhere), a ``torch.compile`` mode,
            a dict ``{"backend": ..., "mode": ..., "options": ...}``, or False to go back to eager.

    Text encoders the learner builds later (``set_classnames``) are compiled the same way. The compiled path
    computes the same function as the eager fast path (same ops; only fusion changes roundings).
    """
    from fastprompt.learners._common import PromptLearner  # cycle: fastprompt.learners imports this module

    options = compile_options(compile)
    for module in learner.modules():
        if isinstance(module, PromptLearner):
            module.__dict__["_compile_options"] = options
        if isinstance(module, PromptedTextEncoder):
            module.compile_fast(options)
    return learner
