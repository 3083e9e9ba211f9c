"""Hub round trip, offline: ``push_to_hub`` against a stubbed ``HfApi`` that copies the upload into a local
folder, and ``from_pretrained("user/repo")`` resolving that folder as the repository's snapshot."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

import fastprompt
from tests.conftest import images_for, tiny_clip


class FakeApi:
    """Records create_repo and copies upload_folder's files into ``remote/<repo_id>``."""

    remote = None
    calls = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=False, exist_ok=False):
        FakeApi.calls.append(("create_repo", repo_id, private, exist_ok))

    def upload_folder(self, folder_path, repo_id, revision=None, commit_message=None):
        FakeApi.calls.append(("upload_folder", repo_id, commit_message))
        dest = os.path.join(FakeApi.remote, repo_id)
        shutil.copytree(folder_path, dest, dirs_exist_ok=True)
        return f"https://huggingface.co/{repo_id}/commit/0"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    import huggingface_hub

    FakeApi.remote, FakeApi.calls = str(tmp_path / "remote"), []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)

    def snapshot_download(repo_id, revision=None, token=None, cache_dir=None, allow_patterns=None):
        return os.path.join(FakeApi.remote, repo_id)  # the local snapshot folder of the repository

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return FakeApi


def test_push_then_from_pretrained(hub):
    clip = tiny_clip(dtype=torch.float32)
    torch.manual_seed(0)
    learner = fastprompt.create_learner("coop", clip, ["cat", "dog", "car"], n_ctx=2, backend="reference").eval()
    with torch.no_grad():
        learner.ctx.add_(torch.randn_like(learner.ctx))
    url = learner.push_to_hub("me/coop-tiny", datasets=["caltech101"], results={"accuracy": 91.25})
    assert url.startswith("https://huggingface.co/me/coop-tiny")
    assert hub.calls[0] == ("create_repo", "me/coop-tiny", False, True)
    remote = os.path.join(hub.remote, "me/coop-tiny")
    assert sorted(os.listdir(remote)) == ["README.md", "fastprompt_config.json", "prompt_learner.safetensors"]
    card = open(os.path.join(remote, "README.md")).read()
    assert "library_name: fastprompt" in card and "- caltech101" in card and "**coop**" in card
    assert "| accuracy | 91.25 |" in card and 'fastprompt.from_pretrained("me/coop-tiny")' in card

    loaded = fastprompt.from_pretrained("me/coop-tiny", clip_model=clip, backend="reference").eval()
    images = images_for(clip, 2, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), learner(images), rtol=0, atol=0)


def test_bad_repo_id_and_missing_repo(hub):
    clip = tiny_clip(dtype=torch.float32)
    learner = fastprompt.create_learner("coop", clip, ["cat", "dog"], n_ctx=2)
    with pytest.raises(ValueError, match="user/name"):
        learner.push_to_hub("not a repo id")
    os.makedirs(os.path.join(hub.remote, "me/empty"))
    with pytest.raises(FileNotFoundError, match="holds no fastprompt_config.json"):
        fastprompt.from_pretrained("me/empty", clip_model=clip)
