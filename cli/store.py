"""`kdcache store ...` (being written)."""

import typer

app = typer.Typer(help="store commands", no_args_is_help=True)


def extract():
    """Stage one: run a teacher once over a dataset into a Zarr feature store."""
    raise typer.Exit(2)
