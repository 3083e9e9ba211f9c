"""Reading image files, with errors that name the file.

A corrupt, truncated or zero-byte image raised PIL's own errors from inside a DataLoader worker (a long
traceback that does not say which file). :func:`load_rgb` raises :class:`ImageDecodeError` naming the path
instead. :func:`check_images` checks many files: ``decode=False`` reads only each header (cheap: what training
does for its train and test images before the first step), ``decode=True`` decodes every pixel (what
``fastprompt datasets`` does; a truncated JPEG is only caught this way), in threads (PIL releases the GIL while
decoding), with a progress bar.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, List, Optional, Tuple

from PIL import Image
from tqdm.auto import tqdm

__all__ = ["ImageDecodeError", "load_rgb", "check_image", "check_images"]


class ImageDecodeError(ValueError):
    """An image file that cannot be read or decoded (the message names it)."""


def load_rgb(path: str):
    """The image at ``path`` as an RGB PIL image (decoded); :class:`ImageDecodeError` naming ``path`` otherwise."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:  # PIL: UnidentifiedImageError, truncated data, bad headers
        raise ImageDecodeError(f"cannot read image {path}: {_reason(path, exc)}") from None


def _reason(path: str, exc: BaseException) -> str:
    try:
        if os.path.getsize(path) == 0:
            return "the file is empty (0 bytes)"
    except OSError:
        pass
    return f"{type(exc).__name__}: {exc}"


def check_image(path: str, decode: bool = True) -> Optional[str]:
    """None when ``path`` is a readable image, else the reason. ``decode=False`` reads the header only."""
    try:
        if os.path.getsize(path) == 0:
            return "the file is empty (0 bytes)"
        with Image.open(path) as img:
            if decode:
                img.load()
    except (OSError, ValueError, SyntaxError) as exc:
        return _reason(path, exc)
    return None


def check_images(paths: Iterable[str], decode: bool = True, progress: bool = False, desc: str = "images",
                 workers: Optional[int] = None) -> List[Tuple[str, str]]:
    """[(path, reason)] of the files among ``paths`` that are not readable images (empty list: all good)."""
    paths = list(dict.fromkeys(paths))
    workers = workers or min(8, os.cpu_count() or 1)
    bar = None
    if progress:
        bar = tqdm(total=len(paths), desc=desc, unit="img", dynamic_ncols=True)
    bad = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for path, reason in zip(paths, pool.map(lambda p: check_image(p, decode), paths, chunksize=64)):
            if reason is not None:
                bad.append((path, reason))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return bad
