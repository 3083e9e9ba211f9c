"""Methods every learner gets for exchanging its tensors with the outside world (a mixin of ``PromptLearner``):
the official repositories' checkpoints (:mod:`fastprompt.official`) and the Hugging Face Hub (:mod:`fastprompt.hub`).
The work is done in those modules; these are thin methods so that ``learner.export_official(...)`` reads well."""
from __future__ import annotations


class InteropMixin:
    def export_official(self, path, epoch: int = 1, dtype=None, layout: str = "dassl-dir") -> list:
        """Write the learned tensors as the official code loads them (see ``fastprompt.official.export_official``);
        returns the files written."""
        from fastprompt.official import export_official  # cycle: fastprompt.official imports the learners

        return export_official(self, path, epoch=epoch, dtype=dtype, layout=layout)

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Upload ``save_pretrained``'s files and a generated model card to the Hub repository ``repo_id``
        (see ``fastprompt.hub.push_to_hub``); returns the commit URL."""
        from fastprompt.hub import push_to_hub  # cycle: fastprompt.hub imports the learners

        return push_to_hub(self, repo_id, **kwargs)
