"""The on-disk adapter written by ``save_pretrained``: one atomically replaced file is the whole save.

An adapter directory holds ``prompt_learner.safetensors`` (the learnable tensors) and ``fastprompt_config.json``.
Since format version 2 the safetensors file also carries the JSON config in its header metadata, so that one
file alone is a complete save. It is written under a unique temporary name, fsync'ed and renamed into place
(:func:`fastprompt.io.atomic_write_bytes`): after ``kill -9`` at any instant the file is either the previous
whole save or the new one, and two processes saving at once never collide on a temporary name. The JSON file is
a human-readable copy written after it; readers take the config from the safetensors header, so a JSON file
left stale by a kill between the two renames is never paired with the wrong weights.

Version 2 also records the backbone the adapter was trained on (:func:`backbone_identity`): the open_clip
architecture, the pretrained tag, and a fingerprint of the text tower's weights. :func:`check_backbone`
refuses to load an adapter onto a CLIP with another fingerprint unless told to (``strict_backbone=False``).
Adapters written before version 2 still load, with a warning that their backbone cannot be checked.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any, Dict

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save

from fastprompt.backbone import clip_source
from fastprompt.io.atomic import atomic_write_bytes

__all__ = ["AdapterError", "FORMAT_VERSION", "CONFIG_FILE", "WEIGHTS_FILE", "write_adapter", "read_adapter_meta",
           "read_adapter_tensors", "backbone_identity", "text_tower_fingerprint", "check_backbone"]

CONFIG_FILE = "fastprompt_config.json"
WEIGHTS_FILE = "prompt_learner.safetensors"
FORMAT_VERSION = 2
_META_KEY = "fastprompt_config"  # the JSON config inside the safetensors header
_SAMPLES = 64  # values sampled per text-tower tensor by the fingerprint


class AdapterError(ValueError):
    """An adapter that is missing, damaged (partial, truncated), or made for another backbone."""


def write_adapter(directory: str, meta: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` ({name: tensor}) and ``meta`` (JSON-serialisable) to ``directory`` as one whole save."""
    meta = dict(meta, format_version=FORMAT_VERSION)
    text = json.dumps(meta, indent=2)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    os.makedirs(directory, exist_ok=True)
    atomic_write_bytes(os.path.join(directory, WEIGHTS_FILE), save(tensors, metadata={_META_KEY: text}))
    atomic_write_bytes(os.path.join(directory, CONFIG_FILE), text.encode("utf-8"))


def _header_meta(path: str):
    """The config stored in the safetensors header of ``path``, or None (a version-1 file has none)."""
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise AdapterError(f"adapter weights {path} are damaged or truncated ({type(exc).__name__}: {exc}); "
                           "save the adapter again") from exc
    if _META_KEY not in metadata:
        return None
    try:
        return json.loads(metadata[_META_KEY])
    except json.JSONDecodeError as exc:
        raise AdapterError(f"adapter weights {path}: the config in the header is not valid JSON ({exc})") from exc


def read_adapter_meta(directory: str) -> Dict[str, Any]:
    """The adapter's config: from the safetensors header (version >= 2), else from ``fastprompt_config.json``."""
    weights, config = os.path.join(directory, WEIGHTS_FILE), os.path.join(directory, CONFIG_FILE)
    if os.path.isfile(weights):
        meta = _header_meta(weights)
        if meta is not None:
            return meta
    if not os.path.isfile(config):
        nested = os.path.join(directory, "adapter")  # a training run's --output-dir holds its adapter here
        if os.path.isfile(os.path.join(nested, WEIGHTS_FILE)):
            raise FileNotFoundError(f"{directory} is a training run, not an adapter folder; load {nested}")
        raise FileNotFoundError(f"{directory} holds no {CONFIG_FILE}; was it written by save_pretrained()?")
    try:
        with open(config, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"adapter config {config} is damaged or truncated ({exc}); save the adapter again") from exc
    if not isinstance(meta, dict):
        raise AdapterError(f"adapter config {config} is not a JSON object")
    if meta.get("format_version", 1) >= 2:
        # A version-2 JSON without a version-2 weights file beside it: the weights are missing or older.
        raise AdapterError(f"adapter {directory} is incomplete: {config} is format version {meta['format_version']} "
                           f"but {weights} is missing or lacks its config header; save the adapter again")
    return meta


def read_adapter_tensors(directory: str) -> Dict[str, torch.Tensor]:
    """{name: tensor} of the adapter; :class:`AdapterError` naming the file when it is missing or damaged."""
    path = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise AdapterError(f"adapter {directory} has no {WEIGHTS_FILE}; it is incomplete, save it again")
    try:
        return load_file(path)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise AdapterError(f"adapter weights {path} are damaged or truncated ({type(exc).__name__}: {exc}); "
                           "save the adapter again") from exc


# ---------------------------------------------------------------------- backbone identity
def _text_parameters(clip: nn.Module):
    """(name, tensor) of the text tower: every parameter outside the image tower and the logit scale/bias."""
    for name, p in sorted(clip.named_parameters(), key=lambda kv: kv[0]):
        if name.startswith("visual.") or name in ("logit_scale", "logit_bias"):
            continue
        yield name, p


def text_tower_fingerprint(clip: nn.Module) -> str:
    """A sha256 (hex, 16 digits) over the text tower's tensor names, shapes and ``_SAMPLES`` evenly spaced
    values of each tensor, as float32.

    Cheap (a few kB read per tensor, whatever the model size or device) and exact: it does not depend on the
    device or on summation order, and two CLIPs with other weights (another pretraining, random init) differ in
    practically every sampled value. Values are compared as float32, so a float64 copy of a float32 model keeps
    its fingerprint; a model cast to a lower precision gets another one.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in _text_parameters(clip):
            flat = p.detach().reshape(-1)
            n = flat.numel()
            k = min(n, _SAMPLES)
            idx = (torch.arange(k, device=flat.device) * (n - 1)) // max(k - 1, 1)  # int64: exact, in range
            h.update(f"{name}:{tuple(p.shape)};".encode())
            h.update(flat[idx].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def backbone_identity(clip: nn.Module) -> Dict[str, Any]:
    """{"model", "pretrained", "text_fingerprint"} of an open_clip CLIP (names as recorded by ``load_clip``)."""
    name, pretrained = clip_source(clip)
    return {"model": name, "pretrained": pretrained, "text_fingerprint": text_tower_fingerprint(clip)}


def check_backbone(directory: str, meta: Dict[str, Any], clip: nn.Module, strict: bool = True) -> None:
    """Refuse (:class:`AdapterError`) to put the adapter of ``directory`` on a CLIP other than the one it was
    trained on, unless ``strict`` is False (then a warning). Version-1 adapters record no backbone: warning."""
    stored = meta.get("clip_backbone")
    if not stored:
        warnings.warn(f"adapter {directory} was written by an older fastprompt and records no backbone identity; "
                      "it cannot be checked against this CLIP (save it again to record it)", stacklevel=3)
        return
    mine = backbone_identity(clip)
    if stored.get("text_fingerprint") == mine["text_fingerprint"]:
        return

    def describe(ident):
        return f"{ident.get('model')}/{ident.get('pretrained')} (text tower fingerprint {ident.get('text_fingerprint')})"

    message = (f"adapter {directory} was trained on {describe(stored)} but is being loaded onto {describe(mine)}")
    if stored.get("pretrained") is None:
        message += " (it was trained on randomly initialised weights, which a rebuild does not reproduce)"
    if strict:
        raise AdapterError(message + "; load it onto the same CLIP, or pass strict_backbone=False "
                                     "(CLI: --allow-backbone-mismatch) to load it anyway")
    warnings.warn(message + " (strict_backbone=False: loading anyway)", stacklevel=3)
