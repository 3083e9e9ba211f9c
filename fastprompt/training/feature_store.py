"""An exact on-disk store of frozen-image-tower features, so a test set is encoded once per backbone.

Learners whose logits depend on the images only through the frozen, unprompted CLIP image encoder declare
``image_features_frozen = True`` and provide ``logits_from_image_features(v)``, where ``v`` [B, E] is exactly
what their ``encode_images(images)`` returns. For them ``evaluate`` reads ``v`` from this store instead of
decoding and encoding every image again (three seeds of base-to-new, several methods on one backbone, the
``eval`` targets all share test sets).

Exactness. An entry is keyed on everything that decides the bits of ``v``: the backbone (architecture name,
pretrained tag and a SHA-256 of the image tower's weights, :func:`backbone_fingerprint`), the image list
(paths, labels, file sizes and modification times), the preprocessing (the transform's ``repr``, which names
resolution, interpolation, crop, mean and std), the dataset and split, the autocast precision, the batch size
(batched matmuls may round differently for another batch shape), the device kind and the torch version.
Features are computed in exactly the batches ``evaluate`` uses, so logits with and without the store are
bit-equal.

Layout: ``<root>/<key digest>/`` holds ``shard-NNNNN-<tag>.safetensors`` files (one tensor ``features``
[rows, E] each) and ``manifest.json`` (the full key, and per shard its file name, rows, byte size and
SHA-256). Each file is written under a unique temporary name and renamed into place; the manifest is renamed
last, so a crash at any point leaves either no manifest (nothing is trusted) or a complete entry. A reader
trusts an entry only when the manifest parses, its key equals the current key, and every shard exists with the
recorded size and hash and the recorded shape and dtype; anything else is rebuilt. Shards are read
memory-mapped (the file's pages are mapped, not copied, until a batch is moved to the device).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
import time
import uuid
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from safetensors.torch import save_file

from fastprompt.backbone import clip_source
from fastprompt.training.data import EpochBatchSampler, collate
from fastprompt.training.trainer import autocast_dtype

__all__ = ["backbone_fingerprint", "image_list_digest", "transform_description", "feature_key", "FeatureStore",
           "default_store_dir", "compute_image_features", "STORE_VERSION"]

STORE_VERSION = 1
MANIFEST = "manifest.json"
_FP_ATTR = "_fastprompt_fingerprint_cache"
_HASH_CHUNK = 1 << 24  # bytes per hashlib update (16 MiB: bounded extra memory for GPU -> CPU copies)


def default_store_dir() -> str:
    """``$FASTPROMPT_FEATURE_STORE`` if set, else ``$XDG_CACHE_HOME/fastprompt/features`` (``~/.cache/...``)."""
    env = os.environ.get("FASTPROMPT_FEATURE_STORE")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "fastprompt", "features")


# ---------------------------------------------------------------------- identity of the inputs
def _tensor_state(module: torch.nn.Module):
    return [(n, t) for n, t in module.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor)]


def backbone_fingerprint(clip_model: torch.nn.Module, tower: str = "visual") -> str:
    """SHA-256 (hex) of a CLIP tower's weights: every tensor's name, dtype, shape and bytes, in state-dict order.

    Args:
        clip_model: an open_clip CLIP model.
        tower: ``"visual"`` (the image tower ``clip_model.visual``: what decides image features) or ``"all"``
            (every tensor of the model: the identity of a whole backbone, e.g. for adapters).
    Returns:
        64 hex characters. Cached on the model object and recomputed when any tensor is replaced or changed
        in place (the cache key holds each tensor's storage pointer and autograd version counter), so repeated
        calls cost nothing. ViT-B/16's image tower (86M fp32 values, 344 MB): about 0.3-1 s once on a CPU.
    """
    if tower not in ("visual", "all"):
        raise ValueError(f"tower must be 'visual' or 'all', got {tower!r}")
    module = clip_model.visual if tower == "visual" else clip_model
    state = _tensor_state(module)
    key = tuple((n, t.data_ptr(), t._version, t.dtype, tuple(t.shape), str(t.device)) for n, t in state)
    cache = clip_model.__dict__.setdefault(_FP_ATTR, {})
    hit = cache.get(tower)
    if hit is not None and hit[0] == key:
        return hit[1]
    h = hashlib.sha256()
    for name, t in state:
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        flat = t.reshape(-1)
        step = max(1, _HASH_CHUNK // max(flat.element_size(), 1))
        for i in range(0, flat.numel(), step):
            part = flat[i : i + step].cpu().contiguous()
            h.update(part.view(torch.uint8).numpy().data if part.numel() else b"")
    digest = h.hexdigest()
    cache[tower] = (key, digest)
    return digest


def image_list_digest(items: Sequence) -> str:
    """SHA-256 of the ordered image list: each item's path, label, file size and mtime (ns).

    ``items`` are ``Datum``-like (``impath``, ``label``). A replaced or rewritten file changes its size or
    modification time and so the digest (a same-size rewrite within the file system's timestamp resolution is
    the one change this cannot see; the feature store documents it)."""
    h = hashlib.sha256()
    for item in items:
        path = os.path.abspath(item.impath)
        try:
            st = os.stat(path)
            stamp = f"{st.st_size}|{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{path}\t{int(item.label)}\t{stamp}\n".encode())
    return h.hexdigest()


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def transform_description(transform) -> str:
    """The transform's ``repr`` (torchvision names size, interpolation, crop, mean, std), with object addresses
    (``<function f at 0x...>``) removed so that the same pipeline describes itself the same in every process."""
    return _ADDRESS.sub("", repr(transform))


def feature_key(clip_model, dataset: str, split: str, items: Sequence, transform, precision: str,
                batch_size: int, device) -> Dict[str, Any]:
    """The full identity of a feature entry (a JSON-able dict; the entry directory is its SHA-256)."""
    device = torch.device(device)
    if device.type == "cuda":
        kind = "cuda:" + torch.cuda.get_device_name(device)
    else:
        kind = device.type
    name, pretrained = clip_source(clip_model)
    return {
        "version": STORE_VERSION,
        "model": name, "pretrained": None if pretrained is None else str(pretrained),
        "visual_sha256": backbone_fingerprint(clip_model, "visual"),
        "dataset": str(dataset), "split": str(split),
        "num_images": len(items), "images_sha256": image_list_digest(items),
        "transform": transform_description(transform),
        "precision": str(precision), "batch_size": int(batch_size),
        "device": kind, "torch": torch.__version__,
    }


def _key_digest(key: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:40]


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------- memory-mapped safetensors reading
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _mmap_safetensor(path: str, name: str = "features") -> torch.Tensor:
    """One tensor of a safetensors file as a CPU tensor over a read-only-file, copy-on-write memory map.

    The safetensors layout: 8-byte little-endian header length, a JSON header giving each tensor's dtype,
    shape and ``data_offsets`` (relative to the end of the header), then the raw little-endian data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    info = header[name]
    dtype = _ST_DTYPES[info["dtype"]]
    start, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if end - start == 0:
        return torch.empty(shape, dtype=dtype)
    # mode "c": pages are mapped from the file and only copied if written (nothing here writes them); torch
    # needs a writable buffer to wrap without a warning.
    raw = np.memmap(path, dtype=np.uint8, mode="c", offset=8 + n + start, shape=(end - start,))
    return torch.from_numpy(raw).view(dtype).view(shape)


class StoredFeatures:
    """[N, E] features held as row shards (memory-mapped when read from the store); ``rows(a, b)`` -> [b-a, E]
    copies only the requested rows (a batch), so reading never materialises the whole set."""

    def __init__(self, shards: Sequence[torch.Tensor]):
        self.shards = list(shards)
        self.offsets = np.cumsum([0] + [s.shape[0] for s in self.shards]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    @property
    def shape(self):
        return (len(self), self.shards[0].shape[1])

    def rows(self, start: int, stop: int) -> torch.Tensor:
        stop = min(stop, len(self))
        parts = []
        for s, (a, b) in zip(self.shards, zip(self.offsets[:-1], self.offsets[1:])):
            lo, hi = max(start, a), min(stop, b)
            if lo < hi:
                parts.append(s[lo - a : hi - a])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def tensor(self) -> torch.Tensor:
        """All rows as one tensor [N, E] (a copy when there are several shards)."""
        return self.rows(0, len(self))


class InvalidEntry(Exception):
    """A stored entry that must not be trusted (the message says why)."""


class FeatureStore:
    """Feature entries under ``root`` (created on first write).

    ``load(key)`` returns the stored features [N, E] (memory-mapped) or None when the entry is missing or
    invalid (``last_problem`` says why); ``save(key, features)`` writes an entry atomically;
    ``get_or_compute(key, compute)`` does both. ``verify``: "hash" (default: every shard's SHA-256 is checked
    on load, a few hundred MB/s) or "size" (sizes, shapes and the key only).
    """

    def __init__(self, root: Optional[str] = None, shard_rows: int = 8192, verify: str = "hash"):
        if verify not in ("hash", "size"):
            raise ValueError(f"verify must be 'hash' or 'size', got {verify!r}")
        if shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
        self.root = os.path.abspath(os.path.expanduser(root or default_store_dir()))
        self.shard_rows, self.verify = int(shard_rows), verify
        self.last_problem: Optional[str] = None
        self.hits = self.misses = 0

    def entry_dir(self, key: Dict[str, Any]) -> str:
        return os.path.join(self.root, _key_digest(key))

    # ------------------------------------------------------------------ read
    def _check(self, key: Dict[str, Any]) -> torch.Tensor:
        d = self.entry_dir(key)
        path = os.path.join(d, MANIFEST)
        if not os.path.isfile(path):
            raise InvalidEntry("no manifest")
        try:
            with open(path) as f:
                manifest = json.load(f)
        except (OSError, ValueError) as exc:
            raise InvalidEntry(f"unreadable manifest: {exc}")
        if not isinstance(manifest, dict) or manifest.get("key") != key:
            raise InvalidEntry("manifest key differs from the current key")
        parts: List[torch.Tensor] = []
        for shard in manifest.get("shards", []):
            file = os.path.join(d, os.path.basename(str(shard.get("file", ""))))
            if not os.path.isfile(file):
                raise InvalidEntry(f"missing shard {shard.get('file')}")
            if os.path.getsize(file) != shard.get("bytes"):
                raise InvalidEntry(f"shard {shard['file']} has {os.path.getsize(file)} bytes, "
                                   f"manifest says {shard.get('bytes')}")
            if self.verify == "hash" and _file_sha256(file) != shard.get("sha256"):
                raise InvalidEntry(f"shard {shard['file']} does not match its SHA-256")
            try:
                t = _mmap_safetensor(file)
            except (OSError, ValueError, KeyError, struct.error, RuntimeError) as exc:
                raise InvalidEntry(f"unreadable shard {shard['file']}: {exc}")
            if t.dim() != 2 or t.shape[0] != shard.get("rows") or str(t.dtype) != manifest.get("dtype"):
                raise InvalidEntry(f"shard {shard['file']} holds {tuple(t.shape)} {t.dtype}, "
                                   "not what the manifest says")
            parts.append(t)
        if not parts or sum(p.shape[0] for p in parts) != key["num_images"]:
            raise InvalidEntry("the shards do not hold one row per image")
        if len({p.shape[1] for p in parts}) != 1:
            raise InvalidEntry("shards of different widths")
        return StoredFeatures(parts)

    def load(self, key: Dict[str, Any]) -> Optional["StoredFeatures"]:
        """The stored features (memory-mapped shards) or None when the entry is missing or invalid."""
        try:
            feats = self._check(key)
        except InvalidEntry as exc:
            self.last_problem = str(exc)
            return None
        self.last_problem = None
        return feats

    # ------------------------------------------------------------------ write
    def save(self, key: Dict[str, Any], features: torch.Tensor) -> str:
        """Write ``features`` [N, E] (N = key["num_images"]) as a new entry; returns its directory.

        Order: the old manifest is removed (the old entry stops being trusted), shards are written under unique
        temporary names and renamed, then the manifest is written to a temporary name and renamed last; finally
        files no manifest names are removed."""
        if features.dim() != 2 or features.shape[0] != key["num_images"]:
            raise ValueError(f"features must be [{key['num_images']}, E], got {tuple(features.shape)}")
        d = self.entry_dir(key)
        os.makedirs(d, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(d, MANIFEST))
        tag = uuid.uuid4().hex[:12]
        feats = features.detach().cpu().contiguous()
        shards = []
        for i, start in enumerate(range(0, feats.shape[0], self.shard_rows)):
            part = feats[start : start + self.shard_rows].contiguous()
            name = f"shard-{i:05d}-{tag}.safetensors"
            tmp = os.path.join(d, f".{name}.{uuid.uuid4().hex}.tmp")
            save_file({"features": part}, tmp)
            _fsync(tmp)
            os.replace(tmp, os.path.join(d, name))
            shards.append({"file": name, "rows": int(part.shape[0]), "bytes": os.path.getsize(os.path.join(d, name)),
                           "sha256": _file_sha256(os.path.join(d, name))})
        manifest = {"key": key, "dtype": str(feats.dtype), "dim": int(feats.shape[1]), "shards": shards}
        tmp = os.path.join(d, f".{MANIFEST}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(d, MANIFEST))
        keep = {s["file"] for s in shards} | {MANIFEST}
        for other in os.listdir(d):
            path = os.path.join(d, other)
            # another writer's temporary files are left alone unless a crash abandoned them a day ago
            with contextlib.suppress(OSError):
                if other not in keep and (not other.endswith(".tmp") or time.time() - os.path.getmtime(path) > 86400):
                    os.remove(path)
        return d

    def get_or_compute(self, key: Dict[str, Any], compute) -> "StoredFeatures":
        """Stored features for ``key``, or ``compute()`` [N, E] saved (and returned as computed)."""
        feats = self.load(key)
        if feats is not None:
            self.hits += 1
            return feats
        self.misses += 1
        feats = compute()
        self.save(key, feats)
        return StoredFeatures([feats])

    def clear(self) -> None:
        """Remove every entry under ``root``."""
        shutil.rmtree(self.root, ignore_errors=True)


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


# ---------------------------------------------------------------------- computing the features
@torch.no_grad()
def compute_image_features(learner, dataset, batch_size: int, device, precision: str = "fp32",
                           num_workers: int = 0) -> torch.Tensor:
    """[N, E] ``learner.encode_images`` of every image of ``dataset`` (map-style ``(image, label)``), in the
    sequential batches of ``batch_size`` that ``evaluate`` uses and under the same autocast, on the CPU."""
    device = torch.device(device)
    sampler = EpochBatchSampler(len(dataset), batch_size, shuffle=False, drop_last=False)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
                                         pin_memory=device.type == "cuda")
    amp = autocast_dtype(precision)
    learner.eval()
    out = []
    for images, _ in loader:
        ctx = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
        with ctx:
            out.append(learner.encode_images(images.to(device, non_blocking=True)).cpu())
    return torch.cat(out)


def stored_features(store: FeatureStore, learner, dataset, dataset_name: str, split: str, batch_size: int, device,
                    precision: str = "fp32", num_workers: int = 0) -> StoredFeatures:
    """The frozen image features of ``dataset`` (a ``DatumDataset``: ``items`` and ``transform``) for
    ``learner``: read from ``store`` when a valid entry exists, else computed (:func:`compute_image_features`)
    and saved. ``learner`` must declare ``image_features_frozen``."""
    if not getattr(learner, "image_features_frozen", False):
        raise TypeError(f"{learner.method} does not declare a frozen, unprompted image tower (image_features_frozen)")
    key = feature_key(learner.clip, dataset_name, split, dataset.items, dataset.transform, precision, batch_size,
                      device)
    return store.get_or_compute(
        key, lambda: compute_image_features(learner, dataset, batch_size, device, precision, num_workers))
