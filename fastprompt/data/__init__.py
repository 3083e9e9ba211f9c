"""Moved to :mod:`fastprompt.datasets.classlists`; this alias warns and will be removed."""
import warnings

from fastprompt.datasets.classlists import list_classname_sets, load_classnames  # noqa: F401

warnings.warn("fastprompt.data moved to fastprompt.datasets.classlists", DeprecationWarning, stacklevel=2)
