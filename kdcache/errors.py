"""Errors a user can act on. The command line prints them (no traceback) and exits non-zero."""

from __future__ import annotations


class KDCacheError(Exception):
    """Base class of every error that names what is wrong with a user's input."""


class DataError(KDCacheError):
    """Bad input data. Names the file, the sample index and the field.

    Args:
        path: the file (or folder) the sample came from.
        index: the sample's index (global where known), or None for whole-file problems.
        field: the field that is wrong (e.g. ``"pos"``), or None.
        message: what is wrong.
    """

    def __init__(self, path, index: int | None, field: str | None, message: str):
        self.path, self.index, self.field, self.message = str(path), index, field, message
        where = [f"file {self.path}"]
        if index is not None:
            where.append(f"sample {index}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}")


class CheckpointError(KDCacheError):
    """A checkpoint that cannot be read or does not fit the model."""


class StoreError(KDCacheError):
    """A feature store that is missing, incomplete, or made for something else."""


class NumericalError(KDCacheError):
    """A loss, weights or predictions that became NaN or infinite (a diverged run, broken weights)."""


class ConfigError(KDCacheError):
    """A configuration (command-line options or YAML) that cannot be served."""
