"""Errors raised by the checkpoint loaders: one class per kind of bad input.

Every message names the file (or directory) and, where there is one, the tensor.
All derive from :class:`CheckpointError`, itself a ``ValueError``.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """Base class for every checkpoint loading or saving error."""


class MissingTensorError(CheckpointError, KeyError):
    """A tensor the configuration needs is absent from the checkpoint."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class UnexpectedTensorError(CheckpointError):
    """The checkpoint holds a tensor the configuration has no place for."""


class ShapeMismatchError(CheckpointError):
    """A tensor's shape disagrees with the configuration."""


class UnknownFormatError(CheckpointError):
    """The path exists but is not a checkpoint format this package reads."""


class ConfigError(CheckpointError):
    """A checkpoint's configuration (e.g. HF config.json) is unsupported or inconsistent."""


class NoCheckpointError(CheckpointError, FileNotFoundError):
    """The path does not exist, or the directory holds no checkpoint."""
