"""In-memory data and tiny learners for the trainer tests (no image files)."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

CLASSNAMES = ["cat", "dog", "golden retriever", "car", "aircraft carrier"]


class NoisyTensorDataset(Dataset):
    """Fixed images plus fresh torch noise per access: a stand-in for random augmentation, so a run is only
    reproducible if the trainer restores/derives the RNG state of every epoch."""

    def __init__(self, n: int, num_classes: int, size: int = 32, dtype=torch.float64, noise: float = 0.05, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, size, size, generator=g, dtype=dtype)
        self.labels = torch.arange(n) % num_classes
        self.noise = noise

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        return self.images[i] + self.noise * torch.randn_like(self.images[i]), int(self.labels[i])


def make_coop(seed: int = 0, classnames=CLASSNAMES, **config):
    import fastprompt
    from tests.conftest import tiny_clip

    clip = tiny_clip(dtype=torch.float64)
    torch.manual_seed(seed)
    return fastprompt.create_learner("coop", clip, classnames, **config)


def train_config(**overrides):
    from fastprompt.training import TrainConfig

    base = dict(method="coop", epochs=4, batch_size=3, lr=0.05, num_workers=0, device="cpu", progress=False,
                precision="fp32", seed=7)
    base.update(overrides)
    return TrainConfig(**base)
