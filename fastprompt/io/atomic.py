"""Atomic file writes that survive ``kill -9`` and concurrent writers.

A file is written under a temporary name unique to the writer (``<name>.tmp.<pid>.<random>``, in the same
directory so the final ``os.replace`` is one rename on one file system), flushed and fsync'ed, then renamed over
the destination. A reader therefore sees either the previous whole file or the new whole file, never a mix, and
two processes saving to the same path at once each rename a complete file of their own (the last rename wins).

A writer killed before its rename leaves its temporary file behind; :func:`clean_orphans` removes the temporary
files of ``<name>`` whose writer process no longer exists (on this host), and every atomic write calls it, so the
leftovers of killed runs do not pile up.
"""
from __future__ import annotations

import os
import secrets
from typing import BinaryIO, Callable, List

__all__ = ["atomic_write", "atomic_write_bytes", "clean_orphans", "fsync_dir", "pid_alive", "temp_name"]

_TMP = ".tmp."


def temp_name(path: str) -> str:
    """``<path>.tmp.<pid>.<8 random hex digits>``: unique per writer and per call."""
    return f"{path}{_TMP}{os.getpid()}.{secrets.token_hex(4)}"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a zombie counts as alive until reaped)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_orphans(path: str) -> List[str]:
    """Remove ``<path>.tmp.<pid>[.<suffix>]`` files whose writer ``pid`` is dead; returns the removed paths.

    Temporary files of live processes (a concurrent writer) are left alone.
    """
    directory, base = os.path.split(os.path.abspath(path))
    prefix = base + _TMP
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(prefix):
            continue
        pid_text = name[len(prefix):].split(".", 1)[0]
        if not pid_text.isdigit() or pid_alive(int(pid_text)):
            continue
        victim = os.path.join(directory, name)
        try:
            os.remove(victim)
            removed.append(victim)
        except OSError:  # another cleaner got it first, or it is not a plain file
            pass
    return removed


def fsync_dir(directory: str) -> None:
    """Flush a directory entry change (a rename) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see the module doc); the parent directory is created."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write(path: str, write: Callable[[BinaryIO], object]) -> None:
    """``write(f)`` fills a binary file that replaces ``path`` atomically once complete (see the module doc);
    the parent directory is created."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    clean_orphans(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_dir(directory)
