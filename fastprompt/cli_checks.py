"""What the CLI checks before it runs, and how it reports a failure or an interruption in one line."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import List, Optional, Tuple

from fastprompt.datasets import build_dataset
from fastprompt.datasets.images import check_images

__all__ = ["check_bench_args", "check_dataset_images", "interrupted_hint", "one_line"]


def check_bench_args(args: argparse.Namespace) -> Optional[str]:
    """The first problem with ``fastprompt bench``'s options (checked before anything runs), or None."""
    for option, value, minimum in (("--classes", args.classes, 1), ("--batch", args.batch, 1),
                                   ("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0),
                                   ("--tasks", args.tasks, 1), ("--n-ctx", args.n_ctx, 1)):
        if value is not None and value < minimum:
            return f"{option} must be >= {minimum}, got {value}"
    if args.classes is not None and not (args.method or args.step):
        return "--classes applies to --method or --step runs (the default cases have fixed class counts)"
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            return f"--json {args.json}: folder {folder} does not exist"
        if not os.access(folder, os.W_OK):
            return f"--json {args.json}: folder {folder} is not writable"
    return None


def check_dataset_images(name: str, root: str, decode: bool = True, progress: bool = True) -> List[Tuple[str, str]]:
    """[(path, reason)] of the unreadable images of every split of dataset ``name`` under ``root``."""
    splits = build_dataset(name, root)
    paths = [d.impath for part in (splits.train_x, splits.val, splits.test) for d in part]
    return check_images(paths, decode=decode, progress=progress and sys.stderr.isatty(), desc=f"{name} images")


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` as one line. An error raised in a DataLoader worker arrives wrapped ("Caught X in
    DataLoader worker process 0. Original Traceback ..."): its last line is the original message."""
    text = str(exc)
    if "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        head, sep, rest = last.partition(": ")
        text = rest if sep and "." in head and " " not in head else last  # drop "module.ErrorType: "
    return text


def interrupted_hint(args: argparse.Namespace, argv: Optional[List[str]]) -> str:
    """What to run to continue after Ctrl-C (train / base2new), or what was interrupted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if args.command not in ("train", "base2new"):
        return f"fastprompt {args.command} stopped; nothing to resume"
    if "--resume" not in argv:
        argv.insert(1, "--resume")  # right after the subcommand: --opts swallows everything after it
    where = getattr(args, "output_dir", None) or "the output directory"
    return (f"the finished epochs are checkpointed in {where}; continue with:\n  fastprompt {shlex.join(argv)}")
