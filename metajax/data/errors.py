"""Errors raised by the few-shot data loaders and the episode sampler.

Each message names the problem and how to fix it.
"""

from __future__ import annotations


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are not where metajax looked; the message says what to get and where."""


class CorruptDatasetError(ValueError):
    """A dataset file exists but cannot be read (truncated or corrupt archive, bad image)."""


class UnknownSplitError(KeyError):
    """A split name that does not exist; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class EpisodeConfigError(ValueError):
    """An episode configuration the data cannot satisfy (too many ways, shots or queries)."""


class CacheError(RuntimeError):
    """A cache file is unreadable or was written for other inputs / another format version."""
