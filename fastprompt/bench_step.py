"""Moved to :mod:`fastprompt.benchmarking.step`; this alias warns and will be removed."""
import warnings

from fastprompt.benchmarking.step import *  # noqa: F401,F403
from fastprompt.benchmarking.step import __all__, _image_size  # noqa: F401

warnings.warn("fastprompt.bench_step moved to fastprompt.benchmarking.step", DeprecationWarning, stacklevel=2)
