"""One writer per run directory: an OS lock on ``<dir>/.fastprompt.lock`` held for the whole command.

``fastprompt train`` / ``base2new`` / ``eval`` take the lock of the directory they write into before writing
anything. It is an ``fcntl.flock`` on an open file, so the operating system releases it when the process dies,
however it dies (``kill -9`` included): there is never a stale lock to delete by hand. The holder writes its pid,
host, start time and command line into the lock file, and a second run into the same directory refuses at once
with :class:`RunDirLocked` naming them.

Within one process the lock is re-entrant (``base2new`` holds its root while each seed's run locks its own
sub-directory, and a caller may lock a directory a nested call locks again). Under ``torchrun`` only rank 0 locks
(every rank shares the directory). On systems without ``fcntl`` (Windows) locking is skipped. The lock file is
deleted when the lock is released, so a finished run directory holds no trace of it.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from typing import Dict, Iterator, List, Optional

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


def _missing_dirs(directory: str) -> List[str]:
    """The directories ``os.makedirs(directory)`` would create, deepest first."""
    out, d = [], os.path.abspath(directory)
    while not os.path.isdir(d):
        out.append(d)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    return out


def _acquire(path: str, directory: str) -> Optional[int]:
    """An fd holding the flock of ``path``, None where the file system cannot lock; RunDirLocked if held."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirLocked(f"{directory} is in use by another fastprompt run ({_holder(path)}); wait for it "
                               "to finish or choose another --output-dir") from None
        except OSError:  # a file system without flock support (some network mounts): run unlocked
            os.close(fd)
            return None
        # The previous holder unlinks the file when it releases: if we locked a file that is no longer at
        # ``path``, another process may hold a new one there, so start again.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def lock_run_dir(directory: str) -> Iterator[None]:
    """Hold the run-directory lock of ``directory`` for the ``with`` block.

    Raises :class:`RunDirLocked` (a ``FileExistsError``) at once when another process holds it. The lock file
    is removed on release, and so is ``directory`` (and the parents created for it) when the block wrote
    nothing into it: a run that fails before writing leaves no trace.
    """
    if fcntl is None or int(os.environ.get("RANK", "0") or 0) != 0:
        yield
        return
    created = _missing_dirs(directory)
    if created and os.path.exists(created[-1]):  # the deepest existing path is a file, not a folder
        raise FileExistsError(f"{directory} cannot be a run directory: {created[-1]} is a file (--output-dir)")
    os.makedirs(directory, exist_ok=True)
    path = os.path.realpath(os.path.join(directory, LOCK_FILE))
    if path in _HELD:
        _HELD[path][1] += 1
        try:
            yield
        finally:
            _HELD[path][1] -= 1
        return
    try:
        fd = _acquire(path, directory)
    except BaseException:
        _remove_empty(created)
        raise
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
                os.unlink(path)  # before unlocking: a waiter that opened it re-checks the inode (_acquire)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            _remove_empty(created)


def _remove_empty(dirs: List[str]) -> None:
    for d in dirs:  # deepest first; stops at the first one that holds something
        try:
            os.rmdir(d)
        except OSError:
            break
