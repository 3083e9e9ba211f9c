"""Interoperability with the official (Dassl-based) repositories: their checkpoints in and out.

    learner = fastprompt.load_official("coop", "output/.../seed1", clip_model=model, classnames=names, n_ctx=16)
    learner.export_official("exported/")          # <model name>/model.pth.tar-<epoch>, loadable officially

The per-method key tables are in :mod:`fastprompt.official.names`.
"""
from fastprompt.official.checkpoint import read_official
from fastprompt.official.convert import convert, export_official, load_official, official_state_dict
from fastprompt.official.names import OFFICIAL_LAYOUTS, official_names

__all__ = ["load_official", "export_official", "convert", "official_state_dict", "official_names",
           "read_official", "OFFICIAL_LAYOUTS"]
