"""Prompt-tuning learners, one method per file.

Every module in this package is imported here, so a learner registers itself (``@register_learner``) just by
living in a file of this folder.
"""
import importlib as _importlib
import pkgutil as _pkgutil

from fastprompt.learners.registry import create_learner, get_learner_class, list_learners, register_learner
from fastprompt.learners.coop import CoOp, CoOpConfig
from fastprompt.learners.cocoop import CoCoOp, CoCoOpConfig
from fastprompt.learners.pretrained import from_pretrained

for _mod in sorted(m.name for m in _pkgutil.iter_modules(__path__)):
    if not _mod.startswith("_"):
        _importlib.import_module(f"{__name__}.{_mod}")

__all__ = [
    "create_learner", "get_learner_class", "list_learners", "register_learner", "from_pretrained",
    "CoOp", "CoOpConfig", "CoCoOp", "CoCoOpConfig",
]
