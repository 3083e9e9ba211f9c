"""Prompted encoders over frozen towers: text (class prompts, the fast engine) and vision (prompt tokens)."""
from fastprompt.encoders.prompted_text import PromptedTextEncoder
from fastprompt.encoders.prompted_vision import PromptedVisionEncoder

__all__ = ["PromptedTextEncoder", "PromptedVisionEncoder"]
