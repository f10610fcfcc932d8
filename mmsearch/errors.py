"""Exceptions the library raises for expected failures.

Every expected failure (bad input, missing weights, a model mismatch, a locked index) is a
:class:`MmsearchError`; the CLI turns these into one clear line and a non-zero exit code.
"""

from __future__ import annotations


class MmsearchError(Exception):
    """Base class for every expected, user-facing failure."""


class MissingDependencyError(MmsearchError):
    """An optional package is needed for this feature; the message says what to install."""

    def __init__(self, package: str, feature: str, extra: str | None = None) -> None:
        hint = f"pip install '{package}'" if extra is None else f"pip install 'mmsearch[{extra}]'"
        super().__init__(f"{feature} needs the package '{package}', which is not installed: {hint}")
        self.package = package


class WeightsUnavailableError(MmsearchError):
    """Model weights could not be found locally nor downloaded."""


class ModelMismatchError(MmsearchError):
    """An index was opened with a different model from the one it was built with."""


class IndexNotFoundError(MmsearchError):
    """No index exists at the given location."""


class IndexLockedError(MmsearchError):
    """Another process is writing to this index."""


class BadMediaError(MmsearchError):
    """A file could not be decoded; the message is the reason recorded for it."""


class BadQueryError(MmsearchError):
    """A query could not be run as given (empty text, missing or undecodable query file...)."""


class ConfigError(MmsearchError):
    """A setting given for an index is invalid or conflicts with the index's own; the message says which."""


class ActiveModelChanged(MmsearchError):
    """Another model became active between embedding a query and searching with it: embed it again."""
