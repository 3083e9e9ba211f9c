"""ImageDataset / build_loader (decoding in workers, seeded order) and Dassl's CLIP transforms."""
from __future__ import annotations

import pytest
import torch

from fastprompt.datasets import (CLIP_MEAN, CLIP_STD, ImageDataset, build_dataset, build_loader, clip_transforms,
                                 make_synthetic_dataset)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_synthetic_dataset(str(tmp_path_factory.mktemp("f")), "imagefolder", 3, 5, image_size=20, seed=0)
    return build_dataset("imagefolder", root)


def test_dataset_item(data):
    img, label = ImageDataset(data.train_x, clip_transforms(16, train=False))[0]
    assert img.shape == (3, 16, 16) and img.dtype == torch.float32 and label == data.train_x[0].label
    raw, _ = ImageDataset(data.train_x)[0]
    assert raw.mode == "RGB" and raw.size == (20, 20)
    with pytest.raises(TypeError, match="Datum"):
        ImageDataset([("/a.png", 0)])


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_and_seeded_order(data, workers):
    tf = clip_transforms(16, train=True)
    labels = []
    for seed in (5, 5, 6):
        loader = build_loader(data.train_x, tf, batch_size=4, shuffle=True, drop_last=True, num_workers=workers,
                              seed=seed)
        batches = list(loader)
        assert len(batches) == len(data.train_x) // 4
        x, y = batches[0]
        assert x.shape == (4, 3, 16, 16) and y.dtype == torch.int64
        labels.append(torch.cat([b[1] for b in batches]).tolist())
        if workers:
            del loader  # persistent workers: shut them down
    assert labels[0] == labels[1]
    assert labels[0] != labels[2]  # another seed, another order


def test_loader_bad_args(data):
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(data.train_x, None, batch_size=0)
    with pytest.raises(TypeError, match="num_workers"):
        build_loader(data.train_x, None, batch_size=2, num_workers=1.0)
    with pytest.raises(TypeError, match="seed"):
        build_loader(data.train_x, None, batch_size=2, seed="0")


def test_transforms_follow_dassl(data):
    import torchvision.transforms as T

    train, test = clip_transforms(224, train=True), clip_transforms(224, train=False)
    assert [type(t) for t in train.transforms] == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor,
                                                   T.Normalize]
    assert train.transforms[0].scale == (0.08, 1.0)
    assert train.transforms[0].interpolation == T.InterpolationMode.BICUBIC
    assert [type(t) for t in test.transforms] == [T.Resize, T.CenterCrop, T.ToTensor, T.Normalize]
    assert tuple(test.transforms[-1].mean) == CLIP_MEAN and tuple(test.transforms[-1].std) == CLIP_STD
    from PIL import Image

    img = Image.open(data.test[0].impath).convert("RGB")
    assert torch.equal(test(img), test(img))  # test transform is deterministic


def test_transforms_from_open_clip_preprocess():
    import open_clip

    pre = open_clip.image_transform(48, is_train=False, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    tf = clip_transforms(pre, train=True)
    assert tf.transforms[0].size == (48, 48) and tuple(tf.transforms[-1].mean) == (0.5, 0.5, 0.5)
    with pytest.raises(TypeError, match="image size"):
        clip_transforms("224", train=False)
    with pytest.raises(ValueError, match="image size"):
        clip_transforms(0, train=False)
