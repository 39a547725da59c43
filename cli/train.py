"""`kdcache train` and `kdcache eval`: thin wrappers around :mod:`kdcache.train` and
:mod:`kdcache.evaluate`.

`kdcache train`'s options are made from the training settings schema
(:class:`kdcache.train.config.TrainConfig`): one option per setting a command line can give, with
the setting's description as help, its type and its allowed values. A new setting is declared
there only.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Optional

import typer

from kdcache.settings import OptionSpec, command_line_options
from kdcache.train.config import TrainConfig, display_name

from .common import user_errors


def _parameter_name(option: OptionSpec) -> str:
    """The Python parameter of an option (a toggle of a list setting is ``<setting>__<choice>``)."""
    return option.name if option.toggle is None else f"{option.name}__{option.toggle}"


def _parameter(option: OptionSpec) -> inspect.Parameter:
    """A typer option for one setting: ``None`` by default, so a ``-c`` file's value stays."""
    decl = f"--{option.flag}/--no-{option.flag}" if option.type is bool else f"--{option.flag}"
    return inspect.Parameter(_parameter_name(option), inspect.Parameter.KEYWORD_ONLY,
                             default=typer.Option(None, decl, help=option.help), annotation=Optional[option.type])


#: one option per setting of the schema that a command line can give (see kdcache.settings)
_OPTIONS = command_line_options(TrainConfig)
_FILE_ONLY = [display_name(n) for n in TrainConfig.model_fields if n not in {o.name for o in _OPTIONS}]
_CONFIG = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path], default=typer.Option(
    None, "--config", "-c", help=f"YAML run configuration: the settings below by their YAML names (snake_case), and "
    f"{', '.join(_FILE_ONLY)} (only a file gives them); options override it."))


@user_errors
def train(config: Optional[Path] = None, **options: Any) -> None:
    """Stage two: train a student against stored teacher targets (the teacher is never loaded).

    Multi-process: `torchrun --nproc-per-node N --no-python kdcache train ...`.
    """
    from kdcache.fs import ensure_output_folder, naming_output
    from kdcache.train import train as run_training

    toggles = {o: options.pop(_parameter_name(o)) for o in _OPTIONS if o.toggle is not None}
    cfg = TrainConfig.load(config, options)
    for option, on in toggles.items():
        if on is not None:  # `--rotate` adds to (`--no-rotate` removes from) the file's `augment`
            kept = [v for v in getattr(cfg, option.name) if v != option.toggle]
            setattr(cfg, option.name, kept + ([option.toggle] if on else []))
    ensure_output_folder(cfg.out)
    with naming_output(cfg.out):  # a failed write (full disk) names the run folder
        result = run_training(cfg)
    typer.echo(f"trained {result['step']} steps; run folder {cfg.out}", err=True)


# typer reads the options from the signature: the schema's, not a hand-written copy
train.__signature__ = inspect.Signature([_CONFIG, *map(_parameter, _OPTIONS)])
train.__annotations__ = {p.name: p.annotation for p in train.__signature__.parameters.values()}


@user_errors
def evaluate(
    checkpoint: Path = typer.Argument(..., help="kdcache or Open Catalyst checkpoint."),
    data: str = typer.Option(..., help="Dataset with energy/force labels."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    batch_size: int = typer.Option(16, help="Structures per batch."),
    device: Optional[str] = typer.Option(None, help="cuda, cpu (default: cuda when available)."),
    num_workers: int = typer.Option(0, help="Data loader worker processes."),
    fast: Optional[bool] = typer.Option(None, "--fast/--no-fast", show_default=False, help=(
        "Compiled model (kdcache.models.fast): same numbers to float32 round-off, 2-6x the throughput on a CPU; "
        "the first batch compiles (tens of seconds cold, seconds with the on-disk cache) and is left out of the "
        "throughput. Neither switch: auto, compiled where the set is large enough for it to pay (the choice is "
        "printed).")),
):
    """Energy MAE, force MAE, force cosine, EFwT and throughput of a checkpoint on a dataset."""
    from kdcache.evaluate import evaluate_checkpoint, format_table

    metrics = evaluate_checkpoint(checkpoint, data, batch_size=batch_size, device=device, num_workers=num_workers,
                                  fast="auto" if fast is None else fast)
    if as_json:
        keys = ("energy_mae", "force_mae", "force_cos", "efwt", "samples_per_s", "force_l2mae", "num_samples", "fast")
        # JSON has no NaN: a throughput not measured (every batch compiled, --fast) is null
        typer.echo(json.dumps({k: (None if isinstance(metrics[k], float) and metrics[k] != metrics[k] else metrics[k])
                               for k in keys}))
    else:
        typer.echo(format_table(metrics))
