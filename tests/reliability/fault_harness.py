"""The fault sweep's machinery: what a try observed (:class:`Outcome`), the cases' registry (:func:`case`),
running a CLI call in this process or in a new one, a Python API call, and the data-loss guard.
Used by ``tests/reliability/fault_sweep.py`` (see its docstring); not a pytest module."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import subprocess
import sys
import time
import traceback
import warnings
from typing import Callable, Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLASSES = ("clear", "ok", "unclear", "silent", "data loss", "crash")
USER_ERRORS = (ValueError, TypeError, OSError, RuntimeError, ImportError)  # what a library check raises
LOCK_NAME = ".fastprompt.lock"


@dataclasses.dataclass
class Outcome:
    """What one try did."""

    code: Optional[int]  # exit status (0: accepted); None: an exception escaped (a traceback was shown)
    out: str = ""
    err: str = ""  # stderr, then the traceback of an escaped exception, then "warning: ..." lines
    seconds: float = 0.0
    crashed: str = ""  # died from a signal, hung, a child writer failed: why
    wrong: str = ""  # a wrong result found by the case's own check
    lost: str = ""  # a previous good artifact damaged: what
    from_check: bool = True  # API: the exception is a user error raised by fastprompt's own code
    note: str = ""  # extra observation for the report


@dataclasses.dataclass
class Case:
    name: str
    group: str
    what: str
    expect: str  # "refuse" | "warn" | "accept"
    names: Sequence[str]  # words (case-insensitive) the message must contain
    run: Callable[["Sweep"], Outcome]
    api: bool = False  # a Python API call: the message is the exception's text
    report: bool = False  # the command reports on stdout (``fastprompt datasets``): any output line may name it
    limit_s: Optional[float] = None  # fail fast: a refusal slower than this is unclear


CASES: List[Case] = []


def case(group: str, what: str, expect: str = "refuse", names: Sequence[str] = (), **kw):
    """Decorator: register ``fn(sweep) -> Outcome`` as a case."""

    def wrap(fn):
        CASES.append(Case(fn.__name__, group, what, expect, tuple(names), fn, **kw))
        return fn

    return wrap


# ---------------------------------------------------------------------------------------------- running one try
@contextlib.contextmanager
def _environ(env: Optional[Dict[str, Optional[str]]]):
    old = {k: os.environ.get(k) for k in (env or {})}
    for k, v in (env or {}).items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _warning_lines(caught) -> str:
    return "".join(f"warning: {' '.join(str(w.message).split())}\n" for w in caught)


def run_cli(argv: Sequence[str], env=None) -> Outcome:
    """``fastprompt ARGV`` in this process: exit status, stdout, stderr (with the traceback a user would see)."""
    from fastprompt.cli import main

    out, err, tb = io.StringIO(), io.StringIO(), ""
    start = time.perf_counter()
    with _environ(env), warnings.catch_warnings(record=True) as caught, \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        warnings.simplefilter("always")
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # noqa: BLE001 - an escaped exception is what the sweep looks for
            code, tb = None, traceback.format_exc()
    return Outcome(code, out.getvalue(), err.getvalue() + tb + _warning_lines(caught), time.perf_counter() - start)


def run_api(fn: Callable[[], object], env=None) -> Outcome:
    """A Python API call: code 0 when it returns, 1 with the exception's one-line text when it raises."""
    start = time.perf_counter()
    with _environ(env), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001
            frames = traceback.extract_tb(exc.__traceback__)
            fastprompt_dir = os.path.join(REPO, "fastprompt") + os.sep
            raised_by_us = bool(frames) and frames[-1].filename.startswith(fastprompt_dir)
            text = f"{type(exc).__name__}: {exc}"
            return Outcome(1, "", text + "\n" + _warning_lines(caught), time.perf_counter() - start,
                           from_check=isinstance(exc, USER_ERRORS) and raised_by_us)
    return Outcome(0, "", _warning_lines(caught), time.perf_counter() - start)


def subprocess_env(extra=None) -> Dict[str, str]:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra or {})
    return env


def run_process(argv: Sequence[str], timeout: float = 300, env=None) -> Outcome:
    """``python3 -m fastprompt.cli ARGV`` in a new process."""
    start = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "fastprompt.cli", *argv], cwd=REPO, env=subprocess_env(env),
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return Outcome(None, str(exc.stdout or ""), str(exc.stderr or ""), time.perf_counter() - start,
                       crashed=f"still running after {timeout:.0f} s")
    o = Outcome(p.returncode, p.stdout, p.stderr, time.perf_counter() - start)
    if p.returncode < 0:
        o.crashed = f"killed by signal {-p.returncode}"
    return o


# ---------------------------------------------------------------------------------------------- data-loss guard
def snapshot(path: str) -> Dict[str, str]:
    """{relative path: sha256} of every file under ``path`` (the run lock file aside)."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return {"": hashlib.sha256(f.read()).hexdigest()}
    out = {}
    for folder, _, files in os.walk(path):
        for name in files:
            if name == LOCK_NAME:
                continue
            full = os.path.join(folder, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def guarded(paths: Sequence[str], fn: Callable[[], Outcome]) -> Outcome:
    """Run ``fn``; any file under ``paths`` changed or removed meanwhile is data loss."""
    before = {p: snapshot(p) for p in paths}
    o = fn()
    for p, files in before.items():
        after = snapshot(p)
        damaged = sorted(k for k, digest in files.items() if after.get(k) != digest)
        if damaged:
            o.lost = f"{p}: changed or removed {damaged}"
    return o


# ---------------------------------------------------------------------------------------------- shared fixtures
TINY_MODEL = {"embed_dim": 32,
              "vision_cfg": {"layers": 1, "width": 32, "head_width": 16, "patch_size": 16, "image_size": 32},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


class Sweep:
    """The sweep's working folder: a tiny ``--model`` JSON, synthetic datasets, fresh output folders, and (built
    on first use) a finished training run, a tiny float64 CLIP and an official-style CoOp checkpoint."""

    def __init__(self, base: str):
        import json
        import shutil

        import torch

        # One thread: the kill loops fork writers from this process, and a fork must not inherit a busy OpenMP
        # pool. The processes the sweep starts get one thread too, so their numbers match in-process runs.
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
        self.base = os.path.join(base, "work")
        shutil.rmtree(self.base, ignore_errors=True)
        os.makedirs(self.base)
        os.environ["FASTPROMPT_FEATURE_STORE"] = os.path.join(self.base, "feature-store")
        self.model = os.path.join(self.base, "fp-sweep-tiny.json")
        with open(self.model, "w") as f:
            json.dump(TINY_MODEL, f)
        from fastprompt.datasets import make_synthetic_dataset

        self.root = os.path.join(self.base, "data")
        for name in ("caltech101", "eurosat"):
            make_synthetic_dataset(self.root, name, num_classes=3, images_per_class=4)
        self._count = 0
        self._memo: Dict[str, object] = {}
        self._good_run: Optional[str] = None
        self._clip = None
        self._official: Optional[str] = None

    def memo(self, key: str, make: Callable[[], object]):
        """``make()`` on the first call for ``key``, the same object afterwards."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def fresh(self, tag: str) -> str:
        """A path under the working folder that does not exist yet."""
        self._count += 1
        return os.path.join(self.base, "runs", f"{self._count:03d}-{tag}")

    def write(self, tag: str, content, binary: bool = False) -> str:
        path = self.fresh(tag)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb" if binary else "w") as f:
            f.write(content)
        return path

    def run_args(self, *extra: str, command: str = "train", out: Optional[str] = None, dataset: str = "caltech101",
                 root: Optional[str] = None, epochs: int = 1) -> List[str]:
        """A train / base2new / zeroshot command line that works, then ``extra`` (later options win)."""
        argv = [command, "--dataset", dataset, "--model", self.model, "--pretrained", "none", "--root",
                root or self.root, "--device", "cpu", "--num-workers", "0", "--no-progress"]
        if command != "zeroshot":
            argv += ["--shots", "2", "--epochs", str(epochs), "--batch-size", "2"]
        if command == "base2new":
            argv += ["--seeds", "1"]
        return argv + ["--output-dir", out or self.fresh(command)] + list(extra)

    def data_copy(self, tag: str, dataset: str = "caltech101"):
        """A private copy of the synthetic ``dataset`` (root, its split file, its Splits) to damage."""
        import glob
        import shutil

        from fastprompt.datasets import build_dataset

        root = self.fresh(f"data-{tag}")
        folder = {"caltech101": "caltech-101", "eurosat": "eurosat"}[dataset]
        shutil.copytree(os.path.join(self.root, folder), os.path.join(root, folder))
        split = glob.glob(os.path.join(root, folder, "split_zhou_*.json"))[0]
        return root, split, build_dataset(dataset, root)

    @property
    def good_run(self) -> str:
        """A finished ``fastprompt train`` run (1 epoch)."""
        if self._good_run is None:
            out = self.fresh("good-run")
            o = run_cli(self.run_args(out=out))
            if o.code != 0:
                raise RuntimeError(f"the reference training run failed: {o.err[-2000:]}")
            self._good_run = out
        return self._good_run

    @property
    def clip(self):
        """The tests' tiny float64 open_clip CLIP (random weights)."""
        if self._clip is None:
            from tests.conftest import tiny_clip

            self._clip = tiny_clip()
        return self._clip

    def learner(self, names=("cat", "dog", "car"), **options):
        import fastprompt

        options.setdefault("n_ctx", 2)
        return fastprompt.create_learner("coop", self.clip, list(names), **options)

    @property
    def official(self) -> str:
        """A Dassl-style CoOp output folder (``prompt_learner/model.pth.tar-3``, ctx of 2 x 32)."""
        if self._official is None:
            import torch

            out = self.fresh("official")
            os.makedirs(os.path.join(out, "prompt_learner"))
            torch.save({"state_dict": {"ctx": torch.randn(2, TINY_MODEL["text_cfg"]["width"])}, "epoch": 3},
                       os.path.join(out, "prompt_learner", "model.pth.tar-3"))
            self._official = out
        return self._official

    def convert_args(self, *extra: str, out: Optional[str] = None) -> List[str]:
        return ["convert", "--method", "coop", "--checkpoint", self.official, "--output-dir",
                out or self.fresh("convert"), "--dataset", "caltech101", "--model", self.model, "--pretrained",
                "none", "--option", "n_ctx=2"] + list(extra)
