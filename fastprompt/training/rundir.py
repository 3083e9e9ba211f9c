"""One writer per run directory: an OS lock on ``<dir>/.fastprompt.lock`` held for the whole command.

``fastprompt train`` / ``base2new`` / ``eval`` take the lock of the directory they write into before writing
anything. It is an ``fcntl.flock`` on an open file, so the operating system releases it when the process dies,
however it dies (``kill -9`` included): there is never a stale lock to delete by hand. The holder writes its pid,
host, start time and command line into the lock file, and a second run into the same directory refuses at once
with :class:`RunDirLocked` naming them.

Within one process the lock is re-entrant (``base2new`` holds its root while each seed's run locks its own
sub-directory, and a caller may lock a directory a nested call locks again). Under ``torchrun`` only rank 0 locks
(every rank shares the directory). On systems without ``fcntl`` (Windows) locking is skipped.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from typing import Dict, Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["LOCK_FILE", "RunDirLocked", "lock_run_dir"]

LOCK_FILE = ".fastprompt.lock"
_HELD: Dict[str, list] = {}  # realpath of the lock file -> [fd, depth]


class RunDirLocked(FileExistsError):
    """Another live process writes into this run directory."""


def _holder(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        return (f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}, "
                f"command: {info.get('command')}")
    except (OSError, ValueError):
        return "a process that has not written its details yet"


@contextlib.contextmanager
def lock_run_dir(directory: str) -> Iterator[None]:
    """Hold the run-directory lock of ``directory`` (created if missing) for the ``with`` block.

    Raises :class:`RunDirLocked` (a ``FileExistsError``) at once when another process holds it.
    """
    if fcntl is None or int(os.environ.get("RANK", "0") or 0) != 0:
        yield
        return
    os.makedirs(directory, exist_ok=True)
    path = os.path.realpath(os.path.join(directory, LOCK_FILE))
    if path in _HELD:
        _HELD[path][1] += 1
        try:
            yield
        finally:
            _HELD[path][1] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirLocked(f"{directory} is in use by another fastprompt run ({_holder(path)}); wait for it to "
                           "finish or choose another --output-dir") from None
    except OSError:  # a file system without flock support (some network mounts): run unlocked
        os.close(fd)
        fd = None
    if fd is None:
        yield
        return
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _HELD[path] = [fd, 1]
    try:
        yield
    finally:
        _HELD[path][1] -= 1
        if _HELD[path][1] == 0:
            del _HELD[path]
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
