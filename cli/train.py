"""`kdcache train` and `kdcache eval` (being written)."""

import typer


def train():
    """Stage two: train a student against stored teacher targets."""
    raise typer.Exit(2)


def evaluate():
    """Evaluate a checkpoint on a dataset."""
    raise typer.Exit(2)
