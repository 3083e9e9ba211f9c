"""Loading of the compiled extension ``fastprompt._C``.

The package must import without it (pure-Python wheels, a wheel built for another torch): ops then fall
back to Triton or their reference. ``load_error()`` keeps the reason so ``env_report()`` can show it.

A C++ extension is bound to the torch it was compiled against (its C++ ABI is not stable across minor
releases), so ``setup.py`` records that torch in ``fastprompt/_build_info.py``; a mismatch is detected here,
before the shared object is loaded (loading it could fail with undefined symbols, or worse, load and misbehave).
"""
from __future__ import annotations

import os
from typing import Optional

import torch  # before _C, which links against libc10/libtorch

_loaded: Optional[bool] = None
_error: Optional[str] = None


def build_info() -> Optional[dict]:
    """What the extension was built against ({"torch": ..., "cuda": ..., "with_cuda": ...}), or None."""
    try:
        from fastprompt._build_info import BUILD_INFO  # optional: written by setup.py when it builds the extension
    except ImportError:
        return None
    return dict(BUILD_INFO)


def _torch_release(version: str) -> str:
    # "2.14.1+cu130" -> "2.14": extensions are compatible across patch releases, not minor ones.
    return ".".join(version.split("+")[0].split(".")[:2])


def _mismatch() -> Optional[str]:
    info = build_info()
    if info is None:
        return None
    built, running = info.get("torch", ""), torch.__version__
    if _torch_release(built) != _torch_release(running):
        return f"it was built for torch {built}, but torch {running} is running; rebuild or install the matching wheel"
    if info.get("with_cuda") and torch.version.cuda and info.get("cuda"):
        if info["cuda"].split(".")[0] != torch.version.cuda.split(".")[0]:
            return f"it was built for CUDA {info['cuda']}, but torch uses CUDA {torch.version.cuda}"
    return None


def extension_loaded() -> bool:
    """True when ``fastprompt._C`` imported and registered its ops (``torch.ops.fastprompt.*``)."""
    global _loaded, _error
    if _loaded is None:
        if os.environ.get("FASTPROMPT_DISABLE_EXT", "0") == "1":
            _loaded, _error = False, "disabled by FASTPROMPT_DISABLE_EXT=1"
        else:
            try:
                why = _mismatch()
                if why:
                    _loaded, _error = False, why
                else:
                    from fastprompt import _C  # noqa: F401  (optional compiled extension; registers its ops)

                    _loaded = True
            except Exception as exc:  # ImportError (not built), OSError / undefined symbol (ABI mismatch)
                _loaded, _error = False, f"{type(exc).__name__}: {exc}"
                if isinstance(exc, ImportError) and build_info() is None and "_C" in str(exc):
                    _error = "not built into this install (a pure-Python wheel, or FASTPROMPT_SKIP_EXT=1)"
    return _loaded


def load_error() -> Optional[str]:
    """Why the extension is not available, or None."""
    extension_loaded()
    return _error


def extension_has_cuda() -> bool:
    """True when the extension was built with CUDA kernels."""
    if not extension_loaded():
        return False
    return bool(torch.ops.fastprompt.built_with_cuda())
