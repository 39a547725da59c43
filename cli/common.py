"""Shared command-line plumbing: user errors become a message and a non-zero exit."""

from __future__ import annotations

import functools

import typer

from kdcache.errors import KDCacheError
from kdcache.fs import os_error_message


def user_errors(fn):
    """Decorator: turn a :class:`KDCacheError` or an ``OSError`` into one ``error: ...`` line on
    stderr and exit code 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KDCacheError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=1)
        except OSError as exc:  # a missing input, a read-only or full disk, a file where a folder goes
            typer.echo(f"error: {os_error_message(exc)}", err=True)
            raise typer.Exit(code=1)

    return wrapper
