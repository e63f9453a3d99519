"""The one error type EditLab raises for a problem a user can fix.

Pure layers (``samplers/``, ``guidance/``) and nodes raise it where the problem is found; nothing catches
and re-wraps it. The message says what is wrong, with the values, and what to do.
"""
from __future__ import annotations


class EditLabError(ValueError):
    """A problem with the user's inputs (a value, a file, a model); the message says what to do."""
