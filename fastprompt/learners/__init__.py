"""Prompt-tuning learners, one method per file."""
from fastprompt.learners.registry import create_learner, get_learner_class, list_learners, register_learner
from fastprompt.learners.coop import CoOp, CoOpConfig
from fastprompt.learners.cocoop import CoCoOp, CoCoOpConfig
from fastprompt.learners.pretrained import from_pretrained

__all__ = [
    "create_learner", "get_learner_class", "list_learners", "register_learner", "from_pretrained",
    "CoOp", "CoOpConfig", "CoCoOp", "CoCoOpConfig",
]
