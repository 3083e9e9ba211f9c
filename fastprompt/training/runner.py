"""End-to-end runs (what the CLI calls): train one (dataset, seed), evaluate a run, base-to-new over seeds.

A training run directory holds ``checkpoint.pt`` (resume state, every epoch), ``log.jsonl``, ``adapter/``
(``save_pretrained``: learnable tensors + learner config), ``run_config.json`` and ``results.json``.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import open_clip
import torch

from fastprompt.backbone import load_clip_reproducible
from fastprompt.datasets import build_dataset, check_dataset
from fastprompt.learners import create_learner, from_pretrained
from fastprompt.pretrained_source import check_pretrained_reachable, read_model_config
from fastprompt.training.checkpoint import CHECKPOINT_FILE, RUN_SETTING_KEYS
from fastprompt.training.config import TrainConfig, base2new_protocol, resolve_defaults
from fastprompt.training.console import RunsETA
from fastprompt.training.data import DatumDataset, test_transform, train_transform
from fastprompt.training.distributed import dist_info, init_distributed
from fastprompt.training.evaluate import evaluate, summarize_base2new, summarize_cross_dataset
from fastprompt.training.feature_store import stored_features
from fastprompt.training.guards import precheck_data
from fastprompt.training.report import write_json, write_report
from fastprompt.training.rundir import lock_run_dir
from fastprompt.training.trainer import Trainer, resolve_device, seed_everything

__all__ = ["build_clip", "load_splits", "train_run", "eval_run", "base2new_run", "RUN_CONFIG", "RESULTS", "ADAPTER_DIR"]

RUN_CONFIG, RESULTS, ADAPTER_DIR = "run_config.json", "results.json", "adapter"


def build_clip(model: str, pretrained: Optional[str], device: torch.device, precision: str = "fp32"):
    """(model, preprocess, tokenizer). ``model`` is an open_clip name or a path to an open_clip model-config
    JSON (registered with ``open_clip.add_model_config`` under its file stem, e.g. a tiny test config)."""
    name = model
    if model.endswith(".json"):
        read_model_config(model)  # a malformed file is an error naming it, and never reaches open_clip's registry
        open_clip.add_model_config(model)
        name = os.path.splitext(os.path.basename(model))[0]
    if pretrained is not None and str(pretrained).lower() == "none":
        pretrained = None
    if pretrained is not None:
        check_pretrained_reachable(name, pretrained)  # offline and not cached: fail now, saying what to do
    try:
        # Random weights are drawn under a fixed seed: `fastprompt eval` rebuilds the backbone a run was trained on.
        clip, preprocess, tokenizer = load_clip_reproducible(name, pretrained=pretrained)
    except Exception as exc:  # noqa: BLE001 - torch / open_clip raise many types for a file that is not a checkpoint
        if pretrained is None or not os.path.isfile(pretrained):
            raise
        raise ValueError(f"--pretrained {pretrained} is not a checkpoint open_clip can load into {name} "
                         f"(loading it raised {type(exc).__name__})") from exc
    if precision == "fp64":
        clip = clip.double()
    clip = clip.to(device)
    clip._fastprompt_source = (name, pretrained)
    return clip, preprocess, tokenizer


def load_splits(name: str, root: str, shots: int, seed: int, subsample: str = "all"):
    """``build_dataset`` with checks that turn bad input into clear errors (missing files, too many shots)."""
    if not name:
        raise ValueError("no dataset given (--dataset)")
    if not root or not os.path.isdir(root):
        raise FileNotFoundError(f"dataset root {root!r} is not a directory (--root)")
    problems = check_dataset(name, root)
    if problems:
        raise FileNotFoundError(f"dataset {name!r} under {root}: " + "; ".join(str(p) for p in problems))
    splits = build_dataset(name, root, shots=shots, seed=seed, subsample=subsample)
    if shots > 0 and splits.train_x:
        largest = max(collections.Counter(d.label for d in splits.train_x).values())
        if largest < shots:
            raise ValueError(f"--shots {shots} is more than any class of {name!r} has (the largest has {largest} "
                             "training images); lower --shots")
    return splits


def _write_run_config(directory: str, cfg: TrainConfig) -> None:
    write_json(os.path.join(directory, RUN_CONFIG), cfg.to_dict())


def read_run_config(directory: str) -> TrainConfig:
    path = os.path.join(directory, RUN_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} is not a finished fastprompt training run (no {RUN_CONFIG})")
    try:
        with open(path) as f:
            return TrainConfig.from_dict(json.load(f))
    except (json.JSONDecodeError, ValueError, TypeError) as exc:
        raise ValueError(f"{path} is damaged: {exc}") from exc


def evaluate_split(learner, splits, cfg: TrainConfig, preprocess, split: str = "test",
                   feature_store=None) -> Dict[str, Any]:
    """Set the learner's classes to ``splits``' and evaluate on one split. ``feature_store``: a
    :class:`~fastprompt.training.feature_store.FeatureStore` to read (or write) the split's image features
    from when the learner declares ``image_features_frozen``; None encodes the images."""
    items = getattr(splits, split)
    if not items:
        raise ValueError(f"dataset {splits.name!r} has an empty {split} split")
    learner.set_classnames(splits.classnames)
    data = DatumDataset(items, test_transform(learner.clip, preprocess))
    device = next(learner.parameters()).device
    feats, used = None, "off"
    if feature_store is not None and getattr(learner, "image_features_frozen", False):
        hits = feature_store.hits
        feats = stored_features(feature_store, learner, data, splits.name, f"{split}:{cfg.subsample}",
                                cfg.test_batch_size, device, cfg.precision, cfg.num_workers)
        used = "hit" if feature_store.hits > hits else "written"
    result = evaluate(learner, data, cfg.test_batch_size, device, cfg.precision, cfg.num_workers,
                      progress=cfg.progress, desc=f"eval {splits.name}/{split}", image_features=feats)
    return dict(result, dataset=splits.name, split=split, subsample=cfg.subsample, feature_store=used)


def train_run(cfg: TrainConfig, resume: bool = False, stop_after_epoch: Optional[int] = None,
              feature_store=None) -> Tuple[Dict[str, Any], Any, Any]:
    """:func:`_train_run` holding the lock of ``cfg.output_dir`` (a second run into it refuses, naming this one)."""
    with lock_run_dir(cfg.output_dir):
        return _train_run(cfg, resume, stop_after_epoch, feature_store)


def _train_run(cfg: TrainConfig, resume: bool = False, stop_after_epoch: Optional[int] = None,
               feature_store=None) -> Tuple[Dict[str, Any], Any, Any]:
    """Train ``cfg.method`` on ``cfg.dataset`` (few-shot, ``cfg.subsample`` classes) and test on its test split
    (its image features through ``feature_store`` when given, see :func:`evaluate_split`).

    Returns (results dict, the trained learner, the preprocess transform). Raises before writing anything when
    the output directory holds a checkpoint and ``resume`` is False.
    """
    cfg = resolve_defaults(cfg.validate())
    ckpt = os.path.join(cfg.output_dir, CHECKPOINT_FILE)
    if os.path.exists(ckpt) and not resume:
        raise FileExistsError(f"{ckpt} already exists; pass --resume to continue that run, or choose another --output-dir")
    device = resolve_device(cfg.device)
    info = init_distributed(str(device))
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        cfg = dataclasses.replace(cfg, device=str(device))
    seed_everything(cfg.seed)  # Dassl seeds before building the dataset (few-shot sampling uses it)
    splits = load_splits(cfg.dataset, cfg.root, cfg.shots, cfg.seed, cfg.subsample)
    precheck_data(splits)  # unreadable train/test image headers fail here, before any training
    clip, preprocess, tokenizer = build_clip(cfg.model, cfg.pretrained, device, cfg.precision)
    seed_everything(cfg.seed)  # the learner's random init depends on the seed only
    learner = create_learner(cfg.method, clip, splits.classnames, config=dict(cfg.learner), tokenizer=tokenizer)
    train_set = DatumDataset(splits.train_x, train_transform(clip, preprocess))
    trainer = Trainer(learner, train_set, cfg, output_dir=cfg.output_dir, splits=splits)
    history = trainer.fit(resume=resume, stop_after_epoch=stop_after_epoch)
    done = [h for h in history if h.get("event") == "epoch"]
    finished = bool(done) and done[-1]["epoch"] >= cfg.epochs
    results: Dict[str, Any] = {"method": cfg.method, "dataset": cfg.dataset, "seed": cfg.seed, "shots": cfg.shots,
                               "subsample": cfg.subsample, "epochs_done": done[-1]["epoch"] if done else 0,
                               "finished": finished}
    if finished and info.is_main:
        learner.save_pretrained(os.path.join(cfg.output_dir, ADAPTER_DIR))
        results["test"] = evaluate_split(learner, splits, cfg, preprocess, "test", feature_store)
        results["accuracy"] = results["test"]["accuracy"]
        _write_run_config(cfg.output_dir, cfg)
        write_json(os.path.join(cfg.output_dir, RESULTS), results)
    if info.enabled:
        torch.distributed.barrier()
    return results, learner, preprocess


def eval_run(run_dir: str, datasets: Sequence[str], root: str, subsample: str = "all", output_dir: Optional[str] = None,
             device: str = "auto", precision: Optional[str] = None, batch_size: Optional[int] = None,
             num_workers: Optional[int] = None, progress: bool = True, strict_backbone: bool = True,
             feature_store=None) -> Dict[str, Any]:
    """:func:`_eval_run` holding the lock of the directory it writes into (``output_dir`` or ``run_dir``)."""
    with lock_run_dir(output_dir or run_dir):
        return _eval_run(run_dir, datasets, root, subsample, output_dir, device, precision, batch_size, num_workers,
                         progress, strict_backbone, feature_store)


def _eval_run(run_dir: str, datasets: Sequence[str], root: str, subsample: str = "all", output_dir: Optional[str] = None,
              device: str = "auto", precision: Optional[str] = None, batch_size: Optional[int] = None,
              num_workers: Optional[int] = None, progress: bool = True, strict_backbone: bool = True,
              feature_store=None) -> Dict[str, Any]:
    """Evaluate a finished run on one or more datasets (``subsample`` classes of each): base-to-new "new",
    cross-dataset transfer and domain generalisation. Writes ``eval_<subsample>.{json,csv,md}``.
    ``feature_store``: see :func:`evaluate_split`."""
    cfg = read_run_config(run_dir)
    overrides = {"subsample": subsample, "device": device, "progress": progress}
    if precision is not None:
        overrides["precision"] = precision
    if batch_size is not None:
        overrides["test_batch_size"] = batch_size
    if num_workers is not None:
        overrides["num_workers"] = num_workers
    cfg = dataclasses.replace(cfg, **overrides).validate()
    adapter = os.path.join(run_dir, ADAPTER_DIR)
    dev = resolve_device(cfg.device)
    clip, preprocess, tokenizer = build_clip(cfg.model, cfg.pretrained, dev, cfg.precision)
    learner = from_pretrained(adapter, clip_model=clip, tokenizer=tokenizer, strict_backbone=strict_backbone)
    results = []
    for name in datasets:
        splits = load_splits(name, root or cfg.root, cfg.shots, cfg.seed, subsample)
        results.append(evaluate_split(learner, splits, cfg, preprocess, "test", feature_store))
    rows = summarize_cross_dataset(results, source=cfg.dataset if len(datasets) > 1 else None)
    out = output_dir or run_dir
    paths = write_report(out, f"eval_{subsample}", rows, ["dataset", "accuracy"],
                         {"run": run_dir, "method": cfg.method, "subsample": subsample, "results": results},
                         title=f"{cfg.method} ({subsample} classes)")
    return {"rows": rows, "results": results, "paths": paths}


def _finished_base2new_run(run_cfg: TrainConfig) -> Optional[Dict[str, Any]]:
    """The summary row of a base-to-new run that already finished with the same settings, or None.

    A finished run has its run config, base results and new results on disk. Reusing them is what ``--resume``
    promises: an interrupted sweep goes on where it stopped instead of re-evaluating every finished seed. A run
    directory whose stored settings differ is not reused; training it again then fails on its checkpoint with
    the list of differing settings.
    """
    paths = [os.path.join(run_cfg.output_dir, name) for name in (RUN_CONFIG, "results_base.json", "results_new.json")]
    if not all(os.path.isfile(p) for p in paths):
        return None
    try:
        stored = read_run_config(run_cfg.output_dir).to_dict()
        with open(paths[1]) as f:
            base = json.load(f)
        with open(paths[2]) as f:
            new = json.load(f)
        base_acc, new_acc = float(base["accuracy"]), float(new["accuracy"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # damaged or partial results: train/evaluate again (the checkpoint decides what resumes)
    wanted = resolve_defaults(run_cfg.validate()).to_dict()
    if any(stored.get(k) != wanted.get(k) for k in RUN_SETTING_KEYS):
        return None
    return {"dataset": run_cfg.dataset, "seed": int(run_cfg.seed), "base": base_acc, "new": new_acc, "reused": True}


def base2new_run(cfg: TrainConfig, datasets: Sequence[str], seeds: Sequence[int], resume: bool = False,
                 feature_store=None) -> Dict[str, Any]:
    """The base-to-new protocol: per dataset and seed, train on the base classes (16 shots by default; PromptKD:
    the unlabelled images of all classes, :func:`~fastprompt.training.config.base2new_protocol`), test on base,
    then rebuild the class-dependent parts for the new classes and test on new. Summary (per dataset and the
    average, H = HM of averaged B and N) in ``base2new.{json,csv,md,png}`` under ``cfg.output_dir``.
    ``feature_store``: shared by every seed's base and new tests (see :func:`evaluate_split`)."""
    if not datasets:
        raise ValueError("base2new needs at least one --dataset")
    if not seeds:
        raise ValueError("base2new needs at least one seed")
    with lock_run_dir(cfg.output_dir):
        return _base2new_run(cfg, datasets, seeds, resume, feature_store)


def _base2new_run(cfg: TrainConfig, datasets: Sequence[str], seeds: Sequence[int], resume: bool,
                  feature_store=None) -> Dict[str, Any]:
    root_out = cfg.output_dir
    protocol = base2new_protocol(cfg.method)
    runs: List[Dict[str, Any]] = []
    total = len(datasets) * len(seeds)
    eta = RunsETA(total)
    for name in datasets:
        for seed in seeds:
            if dist_info().is_main:
                print(f"[fastprompt] base2new run {len(runs) + 1}/{total}: {cfg.method} on {name}, seed {seed}"
                      + eta.text(total - len(runs)), flush=True)
            started = time.perf_counter()
            run_cfg = dataclasses.replace(cfg, dataset=name, seed=int(seed), subsample=protocol["train_subsample"],
                                          output_dir=os.path.join(root_out, name, f"seed{seed}"))
            if resume:
                reused = _finished_base2new_run(run_cfg)
                if reused is not None:
                    runs.append(reused)
                    continue
            result, learner, preprocess = train_run(run_cfg, resume=resume, feature_store=feature_store)
            if not dist_info().is_main:
                continue
            accuracy = {}
            for part in ("base", "new"):
                if part == run_cfg.subsample:  # trained on base: train_run already tested on the base classes
                    tested = result["test"]
                else:
                    part_cfg = dataclasses.replace(resolve_defaults(run_cfg), subsample=part)
                    splits = load_splits(name, run_cfg.root, run_cfg.shots, run_cfg.seed, part)
                    tested = evaluate_split(learner, splits, part_cfg, preprocess, "test", feature_store)
                write_json(os.path.join(run_cfg.output_dir, f"results_{part}.json"), tested)
                accuracy[part] = tested["accuracy"]
            runs.append({"dataset": name, "seed": int(seed), "base": accuracy["base"], "new": accuracy["new"]})
            eta.add(time.perf_counter() - started)
    if not dist_info().is_main:
        return {}
    rows = summarize_base2new(runs)
    paths = write_report(root_out, "base2new", rows, ["dataset", "base", "new", "hm", "seeds"],
                         {"method": cfg.method, "runs": runs}, plot=True, title=f"{cfg.method} base-to-new")
    return {"rows": rows, "runs": runs, "paths": paths}
