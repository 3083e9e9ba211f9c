"""Checks on ``--model`` / ``--pretrained`` before open_clip is asked to build anything.

* A model-config JSON is parsed here first: a malformed file is one error naming it, and it is never registered
  with open_clip (whose registry re-reads every registered file on each later call, so one bad file used to
  break every later model build of the process).
* A pretrained *tag* (``openai``, ``laion2b_s34b_b88k``) whose weights are not in the local cache needs the
  network: when the download host cannot be reached within a few seconds, fail at once saying what to do,
  instead of waiting for the download's own retries and printing its traceback.
"""
from __future__ import annotations

import json
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Dict, Optional
from urllib.parse import urlparse

import open_clip

__all__ = ["read_model_config", "check_pretrained_reachable"]

PROBE_TIMEOUT_S = 5.0


def read_model_config(path: str) -> Dict[str, Any]:
    """The open_clip model config in JSON file ``path``; ValueError naming the file if it is not one."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model config {path!r} does not exist (--model)")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"model config {path} is not valid JSON ({exc}) (--model)") from None
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise ValueError(f"model config {path} is not an open_clip model config: it lacks {missing} (--model)")
    return cfg


def _cached(cfg: Dict[str, Any], cache_dir: Optional[str]) -> bool:
    """Whether the weights of an open_clip pretrained config are already on disk."""
    hub = cfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache  # optional dependency (ImportError tolerated)

            model_id, filename = os.path.split(hub)
            names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
            if any(isinstance(try_to_load_from_cache(model_id, n, cache_dir=cache_dir), str) for n in names):
                return True
        except ImportError:
            pass
    url = cfg.get("url", "")
    if url:
        root = cache_dir or os.path.expanduser("~/.cache/clip")
        if os.path.isfile(os.path.join(root, os.path.basename(url))):
            return True
    return "file" in cfg and os.path.isfile(cfg["file"])


def _reachable(host: str, timeout: float) -> bool:
    def connect():
        with socket.create_connection((host, 443), timeout=timeout):
            return True

    pool = ThreadPoolExecutor(max_workers=1)  # bounds a slow DNS lookup too
    try:
        return pool.submit(connect).result(timeout=timeout)
    except (OSError, FutureTimeout):
        return False
    finally:
        pool.shutdown(wait=False)


def check_pretrained_reachable(name: str, tag: str, cache_dir: Optional[str] = None,
                               timeout: float = PROBE_TIMEOUT_S) -> None:
    """ValueError (one line, what to do) when the weights of ``name``/``tag`` are neither cached nor
    downloadable right now, or when ``tag`` is neither a file nor a tag of ``name``."""
    if os.path.exists(tag) or os.environ.get("FASTPROMPT_SKIP_NETWORK_CHECK"):
        return
    if name.startswith(("hf-hub:", "local-dir:")):
        return
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        known = f"its tags: {', '.join(tags)}" if tags else "it has no pretrained tags"
        raise ValueError(f"--pretrained {tag!r} is neither an existing file nor a pretrained tag of {name} ({known}); "
                         "pass a tag, a checkpoint file, or none")
    if _cached(cfg, cache_dir):
        return
    hosts = [h for h in ("huggingface.co" if cfg.get("hf_hub") else None,
                         urlparse(cfg.get("url", "")).hostname) if h]
    if not hosts or any(_reachable(h, timeout) for h in hosts):
        return
    raise ValueError(f"--pretrained {tag}: the weights of {name} are not in the local cache and {' / '.join(hosts)} "
                     "cannot be reached (offline?); download them once with network access, or pass a local "
                     "checkpoint file: --pretrained /path/to/weights")
