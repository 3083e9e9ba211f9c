"""fastprompt: exact, fast prompt tuning for CLIP-style vision-language models.

    model, preprocess, tokenizer = fastprompt.load_clip("ViT-B-16", pretrained="openai")
    learner = fastprompt.create_learner("coop", model, classnames, n_ctx=16)
    logits = learner(images)
"""
from fastprompt._version import __version__
from fastprompt.backbone import TextTower, load_clip
from fastprompt.classplan import ClassPlan, build_class_plan
from fastprompt.compiling import compile_learner as compile
from fastprompt.encoders.prompted_text import PromptedTextEncoder
from fastprompt.env import env_report
from fastprompt.learners import (
    CoCoOp,
    CoCoOpConfig,
    CoOp,
    CoOpConfig,
    LearnerConfig,
    PromptLearner,
    create_learner,
    from_pretrained,
    get_learner_class,
    list_learners,
    register_learner,
)
from fastprompt.datasets.classlists import load_classnames, list_classname_sets
from fastprompt.official import export_official, load_official

__all__ = [
    "__version__", "load_clip", "TextTower", "ClassPlan", "build_class_plan", "PromptedTextEncoder",
    "create_learner", "compile", "from_pretrained", "list_learners", "register_learner", "get_learner_class",
    "env_report", "PromptLearner", "LearnerConfig",
    "CoOp", "CoOpConfig", "CoCoOp", "CoCoOpConfig", "load_classnames", "list_classname_sets",
    "load_official", "export_official",
]
