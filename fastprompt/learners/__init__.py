"""Prompt-tuning learners, one method per file.

Every module in this package is imported here, so a learner registers itself (``@register_learner``) just by
living in a file of this folder. The public base of a learner and its config: :class:`PromptLearner`,
:class:`LearnerConfig` (``fastprompt/learners/base.py``).
"""
import importlib as _importlib
import pkgutil as _pkgutil

from fastprompt.learners.base import LearnerConfig, PromptLearner
from fastprompt.learners.cocoop import CoCoOp, CoCoOpConfig
from fastprompt.learners.coop import CoOp, CoOpConfig
from fastprompt.learners.pretrained import from_pretrained
from fastprompt.learners.registry import create_learner, get_learner_class, list_learners, register_learner

for _mod in sorted(m.name for m in _pkgutil.iter_modules(__path__)):
    if not _mod.startswith("_"):
        _importlib.import_module(f"{__name__}.{_mod}")

__all__ = [
    "create_learner", "get_learner_class", "list_learners", "register_learner", "from_pretrained",
    "PromptLearner", "LearnerConfig",
    "CoOp", "CoOpConfig", "CoCoOp", "CoCoOpConfig",
]
