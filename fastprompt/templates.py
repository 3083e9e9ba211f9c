"""Hand-crafted prompt templates of the standard datasets (CoOp's ``CUSTOM_TEMPLATES`` table).

Keys are the snake-case dataset names used everywhere in fastprompt (``fastprompt.datasets.classlists`` class lists, the
dataset layer); Dassl's CamelCase names (``"OxfordPets"``, ``"DescribableTextures"``, ...) are accepted too.
KgCoOp (and the CaPT repository's KgCoOp/DePT baselines) use the same table except for DTD.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

__all__ = [
    "CUSTOM_TEMPLATES", "KGCOOP_TEMPLATES", "PROGRAD_TEMPLATES", "IMAGENET_TEMPLATES", "imagenet_templates", "dataset_key", "template_for",
    "format_prompts",
]

CUSTOM_TEMPLATES: Dict[str, str] = {
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": "a photo of a {}.",
    "food101": "a photo of {}, a type of food.",
    "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenetv2": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
}

# KgCoOp's table: identical except DTD (its knowledge-guidance template differs from CaPT's TCI template).
KGCOOP_TEMPLATES: Dict[str, str] = {**CUSTOM_TEMPLATES, "dtd": "a photo of a {}, a type of texture."}

# ProGrad's teacher table (its trainers/prograd.py): the class name moved to the end for the "a type of ..."
# datasets, and "a texture of {}." for DTD; the rest as CUSTOM_TEMPLATES.
PROGRAD_TEMPLATES: Dict[str, str] = {
    **CUSTOM_TEMPLATES,
    "oxford_pets": "a type of pet, a photo of a {}.",
    "oxford_flowers": "a type of flower, a photo of a {}.",
    "fgvc_aircraft": "a type of aircraft, a photo of a {}.",
    "dtd": "a texture of {}.",
    "food101": "a type of food, a photo of {}.",
}

_DASSL_NAMES = {
    "OxfordPets": "oxford_pets", "OxfordFlowers": "oxford_flowers", "FGVCAircraft": "fgvc_aircraft",
    "DescribableTextures": "dtd", "EuroSAT": "eurosat", "StanfordCars": "stanford_cars", "Food101": "food101",
    "SUN397": "sun397", "Caltech101": "caltech101", "UCF101": "ucf101", "ImageNet": "imagenet",
    "ImageNetSketch": "imagenet_sketch", "ImageNetV2": "imagenetv2", "ImageNetA": "imagenet_a", "ImageNetR": "imagenet_r",
}


def dataset_key(name: str) -> str:
    """Normalise a dataset name (``"OxfordPets"``, ``"oxford_pets"``, ``"oxford-pets"``) to its snake-case key."""
    if name in _DASSL_NAMES:
        return _DASSL_NAMES[name]
    key = name.strip().lower().replace("-", "_")
    lowered = {k.lower(): v for k, v in _DASSL_NAMES.items()}
    return lowered.get(key, key)


def template_for(dataset: str, table: Dict[str, str] = CUSTOM_TEMPLATES) -> str:
    """The template of ``dataset`` in ``table``; an unknown dataset (e.g. a user's ImageFolder) gets CLIP's
    generic "a photo of a {}."."""
    return table.get(dataset_key(dataset), "a photo of a {}.")


def format_prompts(template: str, classnames: Sequence[str]) -> List[str]:
    """``template.format(name)`` per class, with ``_`` replaced by a space as the official code does."""
    if "{}" not in template:
        raise ValueError(f"template {template!r} has no '{{}}' slot for the class name")
    return [template.format(c.replace("_", " ")) for c in classnames]


def imagenet_templates() -> List[str]:
    """The 60 ImageNet prompt templates PromptSRC averages its frozen text features over.

    They are the first 60 of the 80 templates of CLIP's ImageNet prompt-engineering notebook (open_clip's
    ``OPENAI_IMAGENET_TEMPLATES``) with "a photo of a {}." moved to the front, in PromptSRC's order. Built from
    open_clip's list (imported here, on first use, because importing open_clip takes seconds).
    """
    notebook = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    first = notebook.index("a photo of a {}.")
    return [notebook[first]] + notebook[:first] + notebook[first + 1 : 60]


def __getattr__(name: str):
    # ``IMAGENET_TEMPLATES`` is computed lazily (PEP 562) so that importing fastprompt does not import open_clip.
    if name == "IMAGENET_TEMPLATES":
        value = imagenet_templates()
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
