"""The two errors of weight loading, in a leaf module that every loader module imports.

Job: define :class:`CheckpointError` and :class:`WeightsNotFoundError` once, below every module that raises them
(:mod:`~odise_model.weights_sources`, :mod:`~odise_model.safe_load`, :mod:`~odise_model.sd_convert`,
:mod:`~odise_model.checkpoint`), so none of those modules has to import another just for an exception.
Users import them from the package: ``from odise_model import CheckpointError, WeightsNotFoundError``.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "WeightsNotFoundError"]


class CheckpointError(ValueError):
    """A weights file is unreadable or does not match the model (message names the file and the keys)."""


class WeightsNotFoundError(FileNotFoundError):
    """A weights file is not available (offline, unreachable, or missing); says where it was looked for."""
