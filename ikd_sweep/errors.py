"""The base of the errors a user causes (bad files, paths, flags, caches, stores, sweeps):
`UserError`, which the CLI reports in one or two lines with exit 2 (cli.py's one policy);
anything else is a bug and keeps its traceback. This module holds the base and the errors
that several modules raise or handle; an error raised by one module only is defined there,
as a `UserError`: ConfigError (config), DataError (data), PickError (trials), SweepBusy
(files), ResourceError (sweep/cluster), ExportError (export), NoFinishedRuns
(analysis/report)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message names the file (and line or field) and what to do about it."""


class ModelError(UserError):
    """A model that cannot be resolved or does not fit the sweep (path, hub id, layers)."""


class CacheError(UserError):
    """A cache entry or checkpoint that cannot be read; the message names its path."""


class StoreError(UserError):
    """A tracking store that is missing, unreachable or not writable."""


class UnknownSweep(StoreError, LookupError):
    """A sweep the tracking store has no (live) parent run of; the message names those it has."""


class PreflightError(UserError):
    """A sweep that cannot run here (e.g. not enough disk for its checkpoints)."""
