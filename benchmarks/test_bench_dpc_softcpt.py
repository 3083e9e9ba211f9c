"""DPC (over CoOp), PromptKD and SoftCPT (NATA) training steps, official reference vs fast path in the same run, and
DPC's hard-negative sampler with the pre-indexed library vs re-reading its JSON index per sample (official).

ViT-B/16 architecture with random weights, float32. CPU sizes are modest (the reference encodes every class at
77 tokens with autograd); on a GPU the sizes grow.
"""
from __future__ import annotations

import json
import random
import time

import pytest
import torch

from benchmarks.conftest import first_call_ms, record
from fastprompt.benchmarking.timing import rel_err as _rel, sync as _sync


@pytest.fixture(scope="module")
def vitb16(device):
    import fastprompt

    torch.manual_seed(0)
    model, _, tokenizer = fastprompt.load_clip("ViT-B-16", pretrained=None)
    return model.to(device=device, dtype=torch.float32).eval(), tokenizer


def _images(n, device, seed):
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed)).to(device)


def test_dpc_step(benchmark, vitb16, device):
    import fastprompt
    from fastprompt.learners.dpc import DPC

    cpu = device.type == "cpu"
    C, B, K = (24, 2, 2) if cpu else (500, 4, 8)  # ImageNet base has 500 classes
    model, tok = vitb16
    names = fastprompt.load_classnames("imagenet")[:C]
    coop = fastprompt.create_learner("coop", model, names, n_ctx=4, tokenizer=tok)
    dpc = DPC.from_tuned(coop, top_k=K, seed=0)
    dpc.set_library({c: _images(1, "cpu", 10 + c)[0:1] for c in range(C)})
    with torch.no_grad():
        dpc.mixed["ctx"].add_(0.01 * torch.randn_like(dpc.mixed["ctx"]))
    images, labels = _images(B, device, 0), torch.arange(B, device=device) * 3
    params = [p for p in dpc.parameters() if p.requires_grad]

    def step():
        dpc.rng.seed(0)
        loss, logits = dpc.compute_loss(images, labels)
        return loss.detach(), logits.detach(), torch.autograd.grad(loss, params)

    dpc.backend = "reference"
    ref, ref_ms = first_call_ms(step, device)  # CPU: the first call's time; GPU: warm-up, then median of 5
    dpc.backend = "auto"
    fast = step()
    err = max(_rel(fast[0], ref[0]), _rel(fast[1], ref[1]), *(_rel(f, r) for f, r in zip(fast[2], ref[2])))
    assert fast[1].shape == ref[1].shape and err < 1e-4, err
    benchmark.pedantic(lambda: (step(), _sync(device)), rounds=1 if cpu else 10, warmup_rounds=0 if cpu else 2)
    fast_ms = benchmark.stats.stats.median * 1e3
    info = {"method": "dpc(coop)", "classes": C, "batch": f"B={B} K={K} B'={ref[1].shape[0]}", "device": str(device),
            "dtype": "float32", "reference_ms": ref_ms, "fast_ms": fast_ms, "speedup": ref_ms / fast_ms,
            "max_rel_err": err, "backend": dpc.backend}
    benchmark.extra_info.update(info)
    record(info)


def test_promptkd_step(benchmark, vitb16, device):
    """One PromptKD distillation step: the reference re-encodes the teacher's class text at 77 tokens and runs
    both image towers through the re-concatenating vision loop; the fast path caches the frozen teacher's text
    features and uses the fast prompted vision encoder. Teacher: PromptSRC on ViT-L/14 on a GPU (the paper's
    pair); on the CPU a second ViT-B/16 keeps the run short."""
    import fastprompt
    from fastprompt.learners.promptkd import PromptKD

    cpu = device.type == "cpu"
    C, B = (24, 4) if cpu else (100, 8)  # the official batch is 8; BatchNorm over 2 samples is ill-conditioned
    model, tok = vitb16
    torch.manual_seed(1)
    t_model, _, t_tok = fastprompt.load_clip("ViT-B-16" if cpu else "ViT-L-14", pretrained=None)
    t_model = t_model.to(device=device, dtype=torch.float32).eval()
    names = fastprompt.load_classnames("imagenet")[:C]
    teacher = fastprompt.create_learner("promptsrc", t_model, names, tokenizer=t_tok)
    kd = PromptKD(model, names, teacher=teacher, tokenizer=tok).to(device).train()
    images = _images(B, device, 2)
    params = [p for p in kd.parameters() if p.requires_grad]

    def step():
        loss, logits = kd.compute_loss(images, None)
        return loss.detach(), logits.detach(), torch.autograd.grad(loss, params)

    kd.backend = "reference"
    ref, ref_ms = first_call_ms(step, device)  # CPU: the first call's time; GPU: warm-up, then median of 5
    kd.backend = "auto"
    fast = step()
    # the first conv's bias has an exactly-zero gradient under training-mode BatchNorm: compare the rest
    names = [n for n, p in kd.named_parameters() if p.requires_grad]
    pairs = [(f, r) for n, f, r in zip(names, fast[2], ref[2]) if n != "projector.0.bias"]
    err = max(_rel(fast[0], ref[0]), _rel(fast[1], ref[1]), *(_rel(f, r) for f, r in pairs))
    assert err < 1e-4, err
    benchmark.pedantic(lambda: (step(), _sync(device)), rounds=1 if cpu else 10, warmup_rounds=0 if cpu else 2)
    fast_ms = benchmark.stats.stats.median * 1e3
    info = {"method": "promptkd", "classes": C, "batch": f"B={B} teacher={'ViT-B/16' if cpu else 'ViT-L/14'}",
            "device": str(device), "dtype": "float32", "reference_ms": ref_ms, "fast_ms": fast_ms,
            "speedup": ref_ms / fast_ms, "max_rel_err": err, "backend": kd.backend}
    benchmark.extra_info.update(info)
    record(info)


def test_softcpt_nata_step(benchmark, vitb16, device):
    import fastprompt

    cpu = device.type == "cpu"
    per_task, B = (8, 2) if cpu else (100, 32)
    model, tok = vitb16
    sets = ["caltech101", "oxford_pets", "food101", "dtd"]
    classes = [fastprompt.load_classnames(s)[:per_task] for s in sets]
    sc = fastprompt.create_learner("softcpt", model, classes, tasknames=[f"{s} recognition" for s in sets], tokenizer=tok)
    images = _images(B, device, 1)
    tasks = torch.tensor([i % 2 for i in range(B)], device=device)  # two of the four tasks present
    labels = torch.arange(B, device=device) % per_task
    params = [p for p in sc.parameters() if p.requires_grad]

    def step():
        loss, logits = sc.compute_loss(images, labels, tasks)
        return loss.detach(), logits.detach(), torch.autograd.grad(loss, params)

    sc.backend = "reference"
    ref, ref_ms = first_call_ms(step, device)  # CPU: the first call's time; GPU: warm-up, then median of 5
    sc.backend = "auto"
    fast = step()
    finite = torch.isfinite(ref[1])
    err = max(_rel(fast[0], ref[0]), _rel(fast[1][finite], ref[1][finite]), *(_rel(f, r) for f, r in zip(fast[2], ref[2])))
    assert err < 1e-4, err
    benchmark.pedantic(lambda: (step(), _sync(device)), rounds=1 if cpu else 10, warmup_rounds=0 if cpu else 2)
    fast_ms = benchmark.stats.stats.median * 1e3
    info = {"method": "softcpt(NATA)", "classes": 4 * per_task, "batch": f"B={B} tasks 2/4", "device": str(device),
            "dtype": "float32", "reference_ms": ref_ms, "fast_ms": fast_ms, "speedup": ref_ms / fast_ms,
            "max_rel_err": err, "backend": sc.backend}
    benchmark.extra_info.update(info)
    record(info)


def test_dpc_sampler_throughput(benchmark, tmp_path):
    """Images per second drawn for hard negatives: pre-indexed library vs the official per-sample JSON read."""
    from PIL import Image

    from fastprompt.learners._hard_negatives import ImageLibrary, default_train_transform

    n_cls, per_class, draws = 50, 16, 32
    index = {"train": [{}], "val": [{}], "train_obj_list": [], "val_obj_list": []}
    items = {}
    for c in range(n_cls):
        paths = []
        for k in range(per_class):
            path = tmp_path / f"c{c:03d}_{k:02d}.jpg"
            Image.new("RGB", (96, 80), ((5 * c) % 255, (17 * k) % 255, 90)).save(path, quality=90)
            paths.append(path.name)
        index["train"][0][f"class{c}"] = [c, paths]
        index["train_obj_list"].append(f"class{c}")
        items[c] = [str(tmp_path / p) for p in paths]
    json_path = tmp_path / "SPLE_toy.json"
    json_path.write_text(json.dumps(index))
    transform = default_train_transform(224)
    labels = [random.Random(0).randrange(n_cls) for _ in range(draws)]

    def official():
        rng = random.Random(0)
        out = []
        for c in labels:  # the JSON library is opened and parsed for every negative
            with open(json_path) as f:
                lib = json.load(f)
            name = rng.choice(lib["train"][0][f"class{c}"][1])
            with Image.open(tmp_path / name) as img:
                out.append(transform(img.convert("RGB")))
        return torch.stack(out)

    library = ImageLibrary(items, transform)

    def indexed():
        return torch.stack(library.sample(labels, random.Random(0)))

    start = time.perf_counter()
    a = official()
    official_s = time.perf_counter() - start
    b = indexed()
    assert a.shape == b.shape == (draws, 3, 224, 224)
    benchmark.pedantic(indexed, rounds=2, warmup_rounds=0)
    indexed_s = benchmark.stats.stats.median
    info = {"method": "dpc sampler", "classes": n_cls, "batch": f"{draws} images, index {n_cls * per_class} files",
            "device": "cpu", "dtype": "-", "reference_ms": official_s * 1e3, "fast_ms": indexed_s * 1e3,
            "speedup": official_s / indexed_s, "max_rel_err": 0.0, "backend": "images/s "
            f"{draws / official_s:.0f} -> {draws / indexed_s:.0f}"}
    benchmark.extra_info.update(info)
    record(info)
