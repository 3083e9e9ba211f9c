"""Reading and writing checkpoints as the official (Dassl-based) repositories do.

Dassl's ``save_model`` writes, for every registered model ``<name>``, ``<output dir>/<name>/model.pth.tar-<epoch>``
(and ``model-best.pth.tar`` when validation picked one), each a ``torch.save``d dict
``{"state_dict", "epoch", "optimizer", "scheduler", ...}``. Its state dict is the registered module's
(``prompt_learner`` for CoOp: keys ``ctx``, ``token_prefix``, ...; the whole ``CustomCLIP`` for MaPLe, PromptSRC,
DePT: ``prompt_learner.ctx``, ``image_encoder.*``, ...).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Union

import torch

EPOCH_FILE = re.compile(r"model\.pth\.tar-(\d+)")
BEST_FILE = "model-best.pth.tar"


@dataclass
class OfficialCheckpoint:
    """What was read: ``parts`` maps a key prefix ("" = whole model, "prompt_learner." = relative to it, None =
    unknown, to be detected) to a state dict; ``files`` the files read; ``epoch`` the stored epoch, if any."""

    parts: List[tuple] = field(default_factory=list)  # [(prefix or None, {key: tensor})]
    files: List[str] = field(default_factory=list)
    epoch: Optional[int] = None


def _torch_load(path: str, trust: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refused: the file holds non-tensor Python objects
        if not trust:
            raise ValueError(
                f"{path}: cannot be read as plain tensors ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                "if you trust this file, pass trust_checkpoint=True (fastprompt convert --trust) to unpickle it fully"
            ) from None
    return torch.load(path, map_location="cpu", weights_only=False)


def _state_dict_of(obj: Any, where: str) -> tuple:
    """A loaded object -> (state dict, epoch or None). Accepts Dassl's dict or a plain {name: tensor} dict."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        epoch = obj.get("epoch")
        state, epoch = obj["state_dict"], (int(epoch) if isinstance(epoch, (int, float)) else None)
    elif isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, epoch = obj, None
    else:
        raise ValueError(
            f"{where}: not a checkpoint: expected a Dassl checkpoint ({{'state_dict': ..., 'epoch': ...}}) or a "
            f"state dict ({{name: tensor}}), got {type(obj).__name__}"
        )
    out = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{where}: state_dict entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k[7:] if k.startswith("module.") else k] = v  # DataParallel's prefix
    return out, epoch


def pick_file(model_dir: str, epoch: Optional[int] = None) -> str:
    """The checkpoint in one Dassl model folder: ``model.pth.tar-<epoch>`` when ``epoch`` is given, else the
    highest epoch, else ``model-best.pth.tar``."""
    names = os.listdir(model_dir)
    epochs = sorted(int(m.group(1)) for m in (EPOCH_FILE.fullmatch(n) for n in names) if m)
    if epoch is not None:
        if epoch not in epochs:
            raise FileNotFoundError(f"{model_dir}: no model.pth.tar-{epoch} (epochs present: {epochs or 'none'})")
        return os.path.join(model_dir, f"model.pth.tar-{epoch}")
    if epochs:
        return os.path.join(model_dir, f"model.pth.tar-{epochs[-1]}")
    if BEST_FILE in names:
        return os.path.join(model_dir, BEST_FILE)
    raise FileNotFoundError(f"{model_dir}: no model.pth.tar-<N> or {BEST_FILE}")


def _is_model_dir(path: str) -> bool:
    return any(EPOCH_FILE.fullmatch(n) or n == BEST_FILE for n in os.listdir(path))


def read_official(source: Union[str, Mapping], models: Optional[Dict[str, str]] = None, epoch: Optional[int] = None,
                  trust: bool = False) -> OfficialCheckpoint:
    """Read a Dassl checkpoint file, a Dassl output directory, or an in-memory (Dassl or plain) state dict.

    ``models`` maps the method's Dassl model names to the prefix their keys are relative to (unknown folders:
    detected from their keys). A directory is either one model folder (holding ``model.pth.tar-<N>``) or an
    output directory with one sub-folder per registered model; in each, ``epoch`` or else the highest epoch
    (else ``model-best.pth.tar``) is read.
    """
    models = models or {}
    ck = OfficialCheckpoint()
    if isinstance(source, Mapping):
        state, ck.epoch = _state_dict_of(source, "checkpoint")
        ck.parts.append((None, state))
        return ck
    source = os.fspath(source)
    if os.path.isfile(source):
        state, ck.epoch = _state_dict_of(_torch_load(source, trust), source)
        ck.parts.append((None, state))
        ck.files.append(source)
        return ck
    if not os.path.isdir(source):
        raise FileNotFoundError(f"official checkpoint {source!r} does not exist")
    if _is_model_dir(source):
        folders = [(os.path.basename(os.path.normpath(source)), source)]
    else:
        folders = sorted((n, os.path.join(source, n)) for n in os.listdir(source)
                         if os.path.isdir(os.path.join(source, n)) and _is_model_dir(os.path.join(source, n)))
        if not folders:
            raise FileNotFoundError(
                f"{source}: no Dassl checkpoint inside (expected <model name>/model.pth.tar-<N> or {BEST_FILE})"
            )
    for name, folder in folders:
        path = pick_file(folder, epoch)
        state, file_epoch = _state_dict_of(_torch_load(path, trust), path)
        ck.parts.append((models.get(name), state))
        ck.files.append(path)
        ck.epoch = file_epoch if ck.epoch is None else ck.epoch
    return ck


def write_dassl(path: str, state: Dict[str, torch.Tensor], epoch: int) -> None:
    """``torch.save`` ``{"state_dict": state, "epoch": epoch, "optimizer": None, "scheduler": None}`` as Dassl's
    ``save_checkpoint`` does (the official ``load_model`` reads ``state_dict`` and ``epoch`` only)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = {"state_dict": {k: v.detach().cpu().contiguous() for k, v in state.items()}, "epoch": int(epoch),
               "optimizer": None, "scheduler": None}
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)
