"""Shared command-line plumbing: user errors become a message and a non-zero exit."""

from __future__ import annotations

import functools
import sys

import typer

from kdcache.errors import KDCacheError


def user_errors(fn):
    """Decorator: turn a :class:`KDCacheError` into ``error: ...`` on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KDCacheError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=1)
        except FileNotFoundError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=1)

    return wrapper


def echo_err(msg: str) -> None:
    print(msg, file=sys.stderr)
