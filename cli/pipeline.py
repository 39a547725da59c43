"""`kdcache pipeline ...` (being written)."""

import typer

app = typer.Typer(help="pipeline commands", no_args_is_help=True)
