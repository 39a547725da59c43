"""Entry point of the ``kdcache`` command (see ``kdcache --help``)."""

from __future__ import annotations

import typer

from kdcache.runtime import set_cpu_threads

from . import data as data_cli
from . import pipeline as pipeline_cli
from . import store as store_cli
from . import train as train_cli

app = typer.Typer(
    help=(
        "kdcache: two-stage offline knowledge distillation for molecular GNNs.\n\n"
        "Stage one (`kdcache extract`) runs a teacher once and stores its features in a Zarr store; "
        "stage two (`kdcache train`) trains students against the stored targets without the teacher."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _global_options(
    threads: int = typer.Option(
        None,
        "--threads",
        envvar="KDCACHE_THREADS",
        help="CPU threads for torch (default: OMP_NUM_THREADS when set, else half the cores).",
    ),
) -> None:
    set_cpu_threads(threads)


app.add_typer(data_cli.app, name="data")
app.command("extract")(store_cli.extract)
app.add_typer(store_cli.app, name="store")
app.command("train")(train_cli.train)
app.command("eval")(train_cli.evaluate)
app.add_typer(pipeline_cli.app, name="pipeline")


if __name__ == "__main__":  # pragma: no cover
    app()
