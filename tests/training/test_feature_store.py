"""The image-feature store: bit-equal logits with and without it, invalidation, atomic writes, memory mapping."""
from __future__ import annotations

import json
import os

import pytest
import torch

from fastprompt.training.data import DatumDataset, collate
from fastprompt.training.data import test_transform as clip_test_transform
from fastprompt.training.evaluate import evaluate
from fastprompt.training.feature_store import (
    FeatureStore, backbone_fingerprint, compute_image_features, feature_key, stored_features,
)
from tests.conftest import tiny_clip
from tests.learner_setups import make_learner, synthetic_splits

FROZEN = ["coop", "cocoop", "kgcoop", "prograd", "dept", "capt", "dpc", "softcpt"]
PROMPTED = ["maple", "ivlp", "promptsrc", "vpt", "vapt", "dapt"]
BATCH = 3  # 4 test images here: one full and one short batch


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    splits = synthetic_splits(tmp_path_factory.mktemp("fs-data"), images_per_class=5)
    clip = tiny_clip(dtype=torch.float32)
    clip._fastprompt_source = ("tiny", None)
    return splits, clip


def _data(clip, splits, transform=None):
    return DatumDataset(splits.test, transform or clip_test_transform(clip))


def _batches(data):
    for a in range(0, len(data), BATCH):
        yield collate([data[i] for i in range(a, min(a + BATCH, len(data)))])


@pytest.mark.parametrize("method", FROZEN)
def test_logits_bit_equal_with_and_without_store(method, env, tmp_path):
    splits, clip = env
    learner = make_learner(method, clip, splits).eval()
    learner.backend = "torch"  # the fast engine on eager ops: the text side is not what the store changes
    assert learner.image_features_frozen
    data = _data(clip, splits)
    store = FeatureStore(str(tmp_path), shard_rows=2)  # several shards, one batch straddles two
    written = stored_features(store, learner, data, "synthetic", "test", BATCH, "cpu")
    read = stored_features(store, learner, data, "synthetic", "test", BATCH, "cpu")
    assert (store.misses, store.hits) == (1, 1) and len(read.shards) > 1
    with torch.no_grad():
        for a, (images, _) in zip(range(0, len(data), BATCH), _batches(data)):
            direct = learner(images)
            for feats in (written, read):
                assert torch.equal(learner.logits_from_image_features(feats.rows(a, a + BATCH)), direct)
    if method not in ("coop", "cocoop"):  # evaluate() through the store once per kind of text side (time)
        return
    plain = evaluate(learner, data, BATCH, "cpu")
    fast = evaluate(learner, data, BATCH, "cpu", image_features=read)
    same = ("correct", "total", "accuracy")
    assert {k: plain[k] for k in same} == {k: fast[k] for k in same}


@pytest.mark.parametrize("method", PROMPTED)
def test_prompted_image_towers_are_not_frozen(method, env, tmp_path):
    splits, clip = env
    learner = make_learner(method, clip, splits)
    assert not learner.image_features_frozen
    with pytest.raises(TypeError, match="image_features_frozen"):
        stored_features(FeatureStore(str(tmp_path)), learner, _data(clip, splits), "synthetic", "test", BATCH, "cpu")


def test_plugins_forward_the_base(env):
    import fastprompt

    splits, clip = env
    names = splits.classnames
    assert fastprompt.create_learner("dept", clip, names, base="coop").image_features_frozen
    assert not fastprompt.create_learner("dept", clip, names, base="maple",
                                         base_config={"prompt_depth": 2}).image_features_frozen
    assert not fastprompt.create_learner("dpc", clip, names, backbone="maple", top_k=2,
                                         backbone_config={"prompt_depth": 2}).image_features_frozen


def _entry(env, tmp_path, method="coop", shard_rows=2):
    splits, clip = env
    learner = make_learner(method, clip, splits).eval()
    learner.backend = "torch"
    data = _data(clip, splits)
    store = FeatureStore(str(tmp_path / "store"), shard_rows=shard_rows)
    key = feature_key(clip, "synthetic", "test", data.items, data.transform, "fp32", BATCH, "cpu")
    feats = compute_image_features(learner, data, BATCH, "cpu")
    return learner, data, store, key, feats


def _shards(store, key):
    d = store.entry_dir(key)
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".safetensors"))


def test_corrupt_truncated_missing_shards_and_foreign_manifest_are_rebuilt(env, tmp_path):
    learner, data, store, key, feats = _entry(env, tmp_path)
    store.save(key, feats)
    assert torch.equal(store.load(key).tensor(), feats)
    shard = _shards(store, key)[0]
    raw = bytearray(open(shard, "rb").read())
    raw[-1] ^= 0x01  # one bit of the last value: same size, different hash
    open(shard, "wb").write(bytes(raw))
    assert store.load(key) is None and "SHA-256" in store.last_problem
    assert torch.equal(store.get_or_compute(key, lambda: feats).tensor(), feats) and store.misses == 1
    assert torch.equal(store.load(key).tensor(), feats)  # rebuilt and trusted again

    with open(_shards(store, key)[1], "r+b") as f:
        f.truncate(10)
    assert store.load(key) is None and "bytes" in store.last_problem
    store.save(key, feats)
    os.remove(_shards(store, key)[0])
    assert store.load(key) is None and "missing" in store.last_problem
    store.save(key, feats)
    manifest = os.path.join(store.entry_dir(key), "manifest.json")
    m = json.load(open(manifest))
    m["key"]["num_images"] += 1  # an entry whose recorded key is not the current one
    json.dump(m, open(manifest, "w"))
    assert store.load(key) is None and "key" in store.last_problem
    open(manifest, "w").write("{ not json")
    assert store.load(key) is None


def test_size_only_verification_still_checks_sizes(env, tmp_path):
    learner, data, store, key, feats = _entry(env, tmp_path)
    store.save(key, feats)
    quick = FeatureStore(store.root, verify="size")
    assert torch.equal(quick.load(key).tensor(), feats)
    with open(_shards(store, key)[0], "ab") as f:
        f.write(b"\0")
    assert quick.load(key) is None


def test_key_follows_images_preprocessing_weights_and_run_settings(env, tmp_path):
    import torchvision.transforms as T

    splits, clip = env
    data = _data(clip, splits)
    key = feature_key(clip, "synthetic", "test", data.items, data.transform, "fp32", BATCH, "cpu")
    again = feature_key(clip, "synthetic", "test", data.items, clip_test_transform(clip), "fp32", BATCH, "cpu")
    assert key == again  # a fresh transform object of the same pipeline is the same preprocessing
    # preprocessing: another interpolation, another resolution, another normalisation
    for other in (T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(32), T.ToTensor()]),
                  T.Compose([T.Resize(36), T.CenterCrop(32), T.ToTensor()])):
        assert feature_key(clip, "synthetic", "test", data.items, other, "fp32", BATCH, "cpu") != key
    # run settings that change the bits: precision, batch shape
    assert feature_key(clip, "synthetic", "test", data.items, data.transform, "bf16", BATCH, "cpu") != key
    assert feature_key(clip, "synthetic", "test", data.items, data.transform, "fp32", BATCH + 1, "cpu") != key
    # an image rewritten on disk (new content and timestamp) is a new image list
    item = data.items[0]
    before = os.stat(item.impath)
    from PIL import Image

    Image.new("RGB", (32, 32), (255, 0, 0)).save(item.impath, format="PNG")
    os.utime(item.impath, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    assert feature_key(clip, "synthetic", "test", data.items, data.transform, "fp32", BATCH, "cpu") != key
    # the image tower's weights decide the key; the text tower's do not (they never touch image features)
    with torch.no_grad():
        clip.token_embedding.weight[0, 0] += 1.0
    assert feature_key(clip, "synthetic", "test", data.items, data.transform, "fp32", BATCH, "cpu")["visual_sha256"] \
        == key["visual_sha256"]
    fingerprint = backbone_fingerprint(clip)
    with torch.no_grad():
        clip.visual.proj[0, 0] += 1.0
    try:
        assert backbone_fingerprint(clip) != fingerprint
        assert feature_key(clip, "synthetic", "test", data.items, data.transform, "fp32", BATCH, "cpu") != key
    finally:
        with torch.no_grad():
            clip.visual.proj[0, 0] -= 1.0
            clip.token_embedding.weight[0, 0] -= 1.0


def test_changed_weights_rebuild_with_new_features(env, tmp_path):
    splits, clip0 = env
    clip = tiny_clip(dtype=torch.float32)
    clip._fastprompt_source = ("tiny", None)
    learner = make_learner("coop", clip, splits).eval()
    learner.backend = "torch"
    data = _data(clip, splits)
    store = FeatureStore(str(tmp_path))
    first = stored_features(store, learner, data, "synthetic", "test", BATCH, "cpu").tensor()
    with torch.no_grad():
        clip.visual.conv1.weight.mul_(1.5)
    second = stored_features(store, learner, data, "synthetic", "test", BATCH, "cpu").tensor()
    assert store.misses == 2 and not torch.equal(first, second)
    assert torch.equal(second, compute_image_features(learner, data, BATCH, "cpu"))


@pytest.mark.parametrize("crash_at", ["shard", "manifest"])
def test_crash_mid_write_leaves_nothing_trusted(env, tmp_path, monkeypatch, crash_at):
    learner, data, store, key, feats = _entry(env, tmp_path)
    store.save(key, feats)  # a valid entry exists; the crash happens while it is being rewritten
    real = os.replace
    calls = []

    def crashing_replace(src, dst):
        calls.append(dst)
        if (crash_at == "shard" and len(calls) == 2) or (crash_at == "manifest" and dst.endswith("manifest.json")):
            raise KeyboardInterrupt("simulated crash")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(KeyboardInterrupt):
        store.save(key, feats * 2)
    monkeypatch.setattr(os, "replace", real)
    assert store.load(key) is None  # neither the old entry nor a partial new one is trusted
    assert torch.equal(store.get_or_compute(key, lambda: feats).tensor(), feats)


def test_shards_are_memory_mapped_safetensors(env, tmp_path):
    from safetensors.torch import load_file

    learner, data, store, key, feats = _entry(env, tmp_path)
    store.save(key, feats)
    loaded = store.load(key)
    files = _shards(store, key)
    assert len(loaded.shards) == len(files) > 1
    maps = open("/proc/self/maps").read().splitlines()
    for shard, path in zip(loaded.shards, files):
        assert torch.equal(shard, load_file(path)["features"])  # a plain safetensors file
        ptr = shard.data_ptr()
        mapped = [line for line in maps if line.endswith(path)]
        assert any(int(r.split()[0].split("-")[0], 16) <= ptr < int(r.split()[0].split("-")[1], 16) for r in mapped), \
            f"{path} is not memory-mapped under the loaded tensor"


def test_cli_flags(env, tmp_path):
    from fastprompt.cli import CLIError, _feature_store, build_parser

    p = build_parser()
    args = p.parse_args(["eval", "--run", "r", "--dataset", "x", "--feature-store", str(tmp_path)])
    assert _feature_store(args).root == str(tmp_path)
    assert _feature_store(p.parse_args(["eval", "--run", "r", "--dataset", "x", "--no-feature-store"])) is None
    assert _feature_store(p.parse_args(["train", "--dataset", "x"])).root == os.environ["FASTPROMPT_FEATURE_STORE"]
    with pytest.raises(CLIError):
        _feature_store(p.parse_args(["base2new", "--dataset", "x", "--no-feature-store", "--feature-store", "d"]))


def test_base2new_cli_same_results_with_and_without_store(tmp_path):
    from fastprompt.cli import main
    from fastprompt.datasets import make_synthetic_dataset
    from tests.training.test_cli_train import TINY

    model = tmp_path / "fp-fs-tiny.json"
    model.write_text(json.dumps(TINY))
    # one backbone for every seed: with --pretrained none each seed would draw its own random CLIP (and the store
    # would rightly miss: another image tower)
    import open_clip

    open_clip.add_model_config(str(model))
    torch.manual_seed(0)
    weights = tmp_path / "tiny.pt"
    torch.save(open_clip.create_model("fp-fs-tiny").state_dict(), weights)
    root = tmp_path / "data"
    make_synthetic_dataset(str(root), "caltech101", num_classes=4, images_per_class=5)
    common = ["base2new", "--method", "coop", "--dataset", "caltech101", "--seeds", "1", "2", "--epochs", "1",
              "--batch-size", "2", "--shots", "1", "--model", str(model), "--pretrained", str(weights),
              "--root", str(root), "--device", "cpu", "--num-workers", "0", "--no-progress"]
    opts = ["--opts", "TRAINER.COOP.N_CTX", "2"]  # REMAINDER: last
    store = tmp_path / "store"
    assert main(common + ["--output-dir", str(tmp_path / "with"), "--feature-store", str(store)] + opts) == 0
    assert main(common + ["--output-dir", str(tmp_path / "without"), "--no-feature-store"] + opts) == 0
    runs = {}
    for name in ("with", "without"):
        runs[name] = json.loads((tmp_path / name / "base2new.json").read_text())["rows"]
    assert runs["with"] == runs["without"]
    used = {(seed, part): json.loads((tmp_path / "with" / "caltech101" / f"seed{seed}" / f"results_{part}.json")
                                     .read_text())["feature_store"] for seed in (1, 2) for part in ("base", "new")}
    assert used == {(1, "base"): "written", (1, "new"): "written", (2, "base"): "hit", (2, "new"): "hit"}
    assert len(os.listdir(store)) == 2  # one entry per test set
    off = json.loads((tmp_path / "without" / "caltech101" / "seed1" / "results_new.json").read_text())
    assert off["feature_store"] == "off"
