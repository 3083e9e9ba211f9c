"""The Hugging Face Hub: ``learner.push_to_hub("user/repo")`` and ``fastprompt.from_pretrained("user/repo")``.

A Hub repository holds exactly what ``save_pretrained`` writes (the learned tensors as safetensors and the JSON
config) plus a generated model card (``README.md``: method, backbone, datasets, results). ``huggingface_hub``
comes with open_clip_torch; without it these functions raise ImportError with the install line.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any, Dict, Optional, Sequence

from fastprompt.learners._common import CONFIG_FILE, WEIGHTS_FILE

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _hub():
    try:
        import huggingface_hub  # optional here: only the Hub functions need it (ImportError with the install line)
    except ImportError:
        raise ImportError("the Hub needs huggingface_hub: pip install huggingface_hub") from None
    return huggingface_hub


def is_repo_id(name: str) -> bool:
    """True for "user/repo" that is not an existing local path."""
    return isinstance(name, str) and not os.path.exists(name) and REPO_ID.fullmatch(name) is not None


def model_card(meta: Dict[str, Any], repo_id: str, datasets: Optional[Sequence[str]] = None,
               results: Optional[Dict[str, Any]] = None, num_parameters: Optional[int] = None) -> str:
    """README.md text for an adapter: YAML front matter (library, tags, datasets) and a short description."""
    method, clip, tag = meta.get("method", "?"), meta.get("clip_model") or "an open_clip model", meta.get("clip_pretrained")
    datasets = list(datasets or [])
    lines = ["---", "library_name: fastprompt", "tags:", "- prompt-tuning", "- clip", f"- {method}"]
    if datasets:
        lines += ["datasets:"] + [f"- {d}" for d in datasets]
    lines += ["---", "", f"# {repo_id.split('/')[-1]}", "",
              f"A **{method}** prompt learner for **{clip}**" + (f" (`{tag}` weights)" if tag else "") +
              ", trained with [fastprompt](https://pypi.org/project/fastprompt/). The repository holds only the "
              "learned tensors; the frozen CLIP is loaded by name.", ""]
    facts = [("method", method), ("backbone", f"{clip}" + (f" / {tag}" if tag else "")),
             ("classes", len(meta.get("classnames", []))), ("fastprompt version", meta.get("fastprompt_version", "?"))]
    if num_parameters is not None:
        facts.append(("learned values", f"{num_parameters:,}"))
    if datasets:
        facts.append(("datasets", ", ".join(datasets)))
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in facts] + [""]
    if results:
        lines += ["## Results", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in results.items()] + [""]
    lines += ["## Use", "", "```python", "import fastprompt", "",
              f'learner = fastprompt.from_pretrained("{repo_id}")   # rebuilds {clip} and loads the prompts',
              "logits = learner(images)                            # [B, 3, H, W] -> [B, C]", "```", "",
              "## Config", "", "```json", json.dumps(meta.get("config", {}), indent=2, default=str), "```", ""]
    return "\n".join(lines)


def push_to_hub(learner, repo_id: str, token: Optional[str] = None, private: bool = False,
                datasets: Optional[Sequence[str]] = None, results: Optional[Dict[str, Any]] = None,
                commit_message: Optional[str] = None, revision: Optional[str] = None) -> str:
    """Upload ``learner.save_pretrained``'s files and a model card to ``repo_id`` (created if missing).

    Returns the commit URL (what ``HfApi.upload_folder`` returns)."""
    if not REPO_ID.fullmatch(str(repo_id)):
        raise ValueError(f"repo_id must look like 'user/name', got {repo_id!r}")
    hub = _hub()
    api = hub.HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        learner.save_pretrained(tmp)
        with open(os.path.join(tmp, CONFIG_FILE)) as f:
            meta = json.load(f)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(meta, repo_id, datasets, results, learner.num_trainable_parameters()))
        api.create_repo(repo_id=repo_id, private=private, exist_ok=True)
        return api.upload_folder(folder_path=tmp, repo_id=repo_id, revision=revision,
                                 commit_message=commit_message or f"fastprompt {meta.get('method')} adapter")


def download(repo_id: str, revision: Optional[str] = None, token: Optional[str] = None,
             cache_dir: Optional[str] = None) -> str:
    """Local folder holding the adapter files of ``repo_id`` (the Hub cache; offline it must be cached)."""
    hub = _hub()
    return hub.snapshot_download(repo_id=repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                 allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, "README.md"])


def resolve(directory: str) -> str:
    """``directory`` itself when it exists locally, else the downloaded snapshot of that Hub repository."""
    if is_repo_id(directory):
        try:
            local = download(directory)
        except Exception as exc:  # noqa: BLE001 - offline, no such repository, no access: all mean "not found"
            why = (str(exc).strip().splitlines() or [""])[-1]
            raise FileNotFoundError(f"{directory!r} is not a local folder, and fetching it as a Hugging Face Hub "
                                    f"repository failed ({type(exc).__name__}: {why}); check the path") from None
        if not os.path.isfile(os.path.join(local, CONFIG_FILE)):
            raise FileNotFoundError(f"Hub repository {directory!r} holds no {CONFIG_FILE}; was it pushed by fastprompt?")
        return local
    return directory
