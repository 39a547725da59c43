"""The pipeline's only contact with the other parts of kdcache (data, models, stage one, stage two,
evaluation). Everything is called in-process through the packages' Python APIs; each adapter is
small so that an API change touches one function here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from kdcache import keys as K
from kdcache.errors import ConfigError


# --- devices -------------------------------------------------------------------------------------
def resolve_device(device: str | None) -> str:
    """``auto`` -> ``cuda`` when present, else ``cpu``."""
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# --- data ----------------------------------------------------------------------------------------
def make_demo_data(out: Path, num_train: int, num_val: int, num_test: int, seed: int, num_pool: int = 0) -> dict:
    """Write the embedded demo splits (and the unlabelled ``pool`` when ``num_pool``) into ``out``
    and return ``{split: file name}``."""
    from kdcache.data.demo import write_demo

    paths = write_demo(out, num_train=num_train, num_val=num_val, num_test=num_test, seed=seed, progress=True,
                       num_pool=num_pool)
    return {split: str(Path(p).resolve().relative_to(out.resolve())) for split, p in paths.items()}


def sample_candidates(seed_data: str | Path, out: Path, settings: dict) -> dict:
    """Write ``kdcache data sample``'s candidates of ``seed_data`` into the LMDB ``out``.

    Args:
        seed_data: the seed structures (the training split or the unlabelled pool).
        out: the ``.lmdb`` file (it appears only when complete).
        settings: :class:`kdcache.data.candidates.CandidateSettings` fields.

    Returns:
        The counts the candidates' provenance records (seed structures, candidates, rejected draws).
    """
    from tqdm import tqdm

    from kdcache.data.candidates import CandidateSettings, write_candidates

    with tqdm(desc="candidates", unit="seed structure") as bar:
        meta = write_candidates(seed_data, out, CandidateSettings(**settings), progress=bar.update)
    return meta["counts"]


def open_dataset(path: str | Path, **options):
    from kdcache.data import open_dataset as _open

    return _open(path, **options)


# --- models --------------------------------------------------------------------------------------
def build_preset(name: str, device: str | torch.device | None = None, **overrides):
    """Build a preset model (on ``device``; ``"meta"`` allocates nothing)."""
    from kdcache.models.presets import build_preset as _build

    if device is None:
        return _build(name, **overrides)
    with torch.device(device):
        return _build(name, **overrides)


def count_preset(name: str, **overrides) -> dict:
    """Registry name, hidden features and parameter count of a preset, built on the meta device
    (no memory for weights) and on CPU only when a constructor cannot run on meta."""
    try:
        model = build_preset(name, device="meta", **overrides)
        where = "meta"
    except ConfigError:
        raise
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"preset {name!r}: {exc}") from None
    except Exception:  # e.g. a basis computed with numpy during construction
        model = build_preset(name, **overrides)
        where = "cpu"
    params = sum(p.numel() for p in model.parameters())
    return {"name": model.name, "params": int(params), "features": tuple(model.available_features),
            "built_on": where}


def load_model(checkpoint: str | Path, device: str):
    from kdcache.evaluate import load_model as _load

    return _load(checkpoint, device)


def checkpoint_model_name(checkpoint: str | Path) -> str | None:
    """The registry name a checkpoint records (kdcache or Open Catalyst layout), or None.

    Raises:
        CheckpointError: the file cannot be read as data (e.g. it would run code when unpickled).
    """
    from kdcache.models.checkpoint import read_checkpoint

    # mmap: only the metadata is wanted, a teacher's weights may be gigabytes
    ck = read_checkpoint(checkpoint, mmap=True)
    name = ck.get("model")
    if name is None and isinstance(ck.get("config"), dict):
        name = ck["config"].get("model")
        if isinstance(name, dict):
            name = name.get("name")
    return str(name).lower().replace("-", "_") if name else None


def checkpoint_summary(checkpoint: str | Path) -> dict:
    """Registry name, hidden features and parameter count of the model a checkpoint holds (its
    own configuration, which wins over a preset's)."""
    from kdcache.models.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint).model
    return {"name": model.name, "params": int(sum(p.numel() for p in model.parameters())),
            "features": tuple(model.available_features), "built_on": "checkpoint"}


# --- stage two: training ----------------------------------------------------------------------
def train(settings: dict, out: Path, device: str) -> dict:
    """Train one model with ``kdcache train``'s Python API (resumes when ``out`` holds a run).

    Args:
        settings: TrainConfig settings (student, data, val, store, strategy, feature_loss, ...).
        out: the run folder.

    Returns:
        ``{"checkpoint": best (or last) checkpoint, "metrics": metrics.csv}`` relative to ``out``.
    """
    from kdcache.train.config import TrainConfig

    cfg = TrainConfig.from_dict({**settings, "out": str(out), "device": device}, source=f"pipeline run {out}")
    from kdcache.train import train as run_training

    run_training(cfg)
    return train_outputs(out)


def train_outputs(out: Path) -> dict:
    """The files a finished run in ``out`` left: its best checkpoint (the last one without
    validation) and its metrics, relative to ``out`` (``""``: no metrics were written)."""
    from kdcache.train.trainer import BEST, LAST, METRICS_FILE

    out = Path(out)
    ckpt = next((name for name in (BEST, LAST) if (out / name).exists()), None)
    if ckpt is None:
        raise ConfigError(f"training in {out} finished without a checkpoint ({BEST} / {LAST})")
    return {"checkpoint": ckpt, "metrics": METRICS_FILE if (out / METRICS_FILE).exists() else ""}


# --- stage one: extraction ---------------------------------------------------------------------
#: extract settings a recipe gives elsewhere (``store.options`` may not change them) -> that key
_EXTRACT_OWNED = {"data": "data", "out": "out", "teacher": "teacher.preset", "checkpoint": "teacher.checkpoint",
                  "features": "store.features", "dtype": "store.dtype", "batch_size": "store.batch_size",
                  "device": "device"}
def check_extract_options(options: dict, where: Callable[[str], str]) -> dict:
    """Check ``store.options`` against ``kdcache extract``'s settings (its schema,
    :class:`kdcache.store.request.ExtractRequest`): known names, not one the recipe sets
    elsewhere, and values the extraction accepts (types, a codec it knows, positive sizes...).

    Args:
        options: setting -> value.
        where: how a message names an option, ``name -> text``.

    Raises:
        ConfigError: ``"<where(name)>: <what is wrong>"``.
    """
    from kdcache.store.request import ExtractRequest

    for k in options:
        if k in _EXTRACT_OWNED:
            raise ConfigError(f"{where(k)}: is set by the recipe's `{_EXTRACT_OWNED[k]}`; remove it here")
        if k not in ExtractRequest.model_fields:
            known = ", ".join(p for p in ExtractRequest.model_fields if p not in _EXTRACT_OWNED)
            raise ConfigError(f"{where(k)}: not a setting of kdcache extract; known: {known}")
    ExtractRequest.check_options(options, where)
    return options


def extract(checkpoint: str | Path | None, teacher, data: str | Path, out: Path, features: tuple[str, ...] | None,
            dtype: str, batch_size: int, device: str, options: dict | None = None) -> None:
    """Run ``kdcache extract``'s Python API (it resumes an interrupted store by itself).

    Args:
        checkpoint: the model teacher's weights (None for a calculator teacher).
        teacher: a preset name, or a :class:`~kdcache.teachers.calculator.CalculatorSpec` (from the
            recipe's fixed calculator table, never from a string the recipe gives).
        features: ``--features`` names; None: all the teacher offers (a calculator's choice).
    """
    from kdcache.store.extract import extract as run_extract

    options = check_extract_options(dict(options or {}), lambda k: f"store.options.{k}")
    run_extract(checkpoint=None if checkpoint is None else str(checkpoint), teacher=teacher, data=str(data),
                out=str(out), features=None if features is None else list(features), dtype=dtype,
                batch_size=batch_size, device=device, progress=True, **options)


# --- calculator teachers ---------------------------------------------------------------------------
def calculator_identity(spec) -> dict:
    """What decides a calculator teacher's values (its arguments, package version and source),
    as its stores record it; builds the calculator once (a package that is missing fails here,
    before any stage runs).

    Args:
        spec: a :class:`~kdcache.teachers.calculator.CalculatorSpec`.
    """
    from kdcache.teachers.calculator import CalculatorTeacher

    return CalculatorTeacher(spec).identity()


def evaluate_calculator(spec, data: str | Path, num_samples: int, batch_size: int) -> tuple[dict, dict]:
    """An ASE calculator on a labelled dataset, measured as ``kdcache eval`` measures a model.

    The calculator runs through its teacher's runner (:mod:`kdcache.teachers.calculator`, the code
    that labels a store), so the values are those it would store.

    Args:
        spec: a :class:`~kdcache.teachers.calculator.CalculatorSpec`.
        data: the labelled dataset (the test split).
        num_samples: predictions are kept for the first ``num_samples`` structures (plots).
        batch_size: structures per batch.

    Returns:
        ``(metrics, predictions)``: ``kdcache eval``'s metrics (``samples_per_s``: structures per
        second of calculator time, in this process) and :func:`collect`'s predictions.
    """
    import time

    from kdcache.data.batch import LABELS, collate
    from kdcache.evaluate import MetricSums
    from kdcache.teachers.calculator import CalculatorTeacher

    ds = open_dataset(data)
    sums = MetricSums()
    preds: dict[str, list] = {"energy_true": [], "energy_pred": [], "forces_true": [], "forces_pred": [], "natoms": []}
    with CalculatorTeacher(spec).runner(["outputs"], ds) as runner:
        for start in range(0, len(ds), batch_size):
            ids = list(range(start, min(start + batch_size, len(ds))))
            items = [ds[i] for i in ids]
            batch = collate(items, ds, require=LABELS)
            t0 = time.perf_counter()
            out = runner(items, ids, advance=lambda n: None)
            sums.seconds += time.perf_counter() - t0
            sums.timed_structures += len(ids)
            fixed = batch[K.FIXED] if K.FIXED in batch else None
            sums.add(out[K.ENERGY], out[K.FORCES], batch[K.ENERGY], batch[K.FORCES], batch[K.BATCH], batch[K.NATOMS],
                     fixed)
            keep = min(len(ids), max(0, num_samples - start))
            if keep:
                free = ~fixed.bool() if fixed is not None else torch.ones(len(batch[K.FORCES]), dtype=torch.bool)
                atoms = int(batch[K.NATOMS][:keep].sum())
                free = free[:atoms]
                preds["energy_true"].append(batch[K.ENERGY][:keep].double())
                preds["energy_pred"].append(out[K.ENERGY][:keep].double())
                preds["forces_true"].append(batch[K.FORCES][:atoms][free].double())
                preds["forces_pred"].append(out[K.FORCES][:atoms][free].double())
                preds["natoms"].append(batch[K.NATOMS][:keep])
    cat = lambda xs: torch.cat(xs).numpy() if xs else np.zeros(0)  # noqa: E731
    return sums.result(), {k: cat(v) for k, v in preds.items()}


# --- evaluation -----------------------------------------------------------------------------------
def evaluate(checkpoint: str | Path, data: str | Path, batch_size: int, device: str, fast: bool | str = "auto") -> dict:
    """``kdcache eval``'s metrics of a checkpoint (energy_mae meV, force_mae meV/Å, force_cos,
    efwt as a fraction, samples_per_s); ``fast`` as ``kdcache eval``'s (the recipe's ``eval.fast``)."""
    from kdcache.evaluate import evaluate_checkpoint

    metrics = dict(evaluate_checkpoint(checkpoint, data, batch_size=batch_size, device=device, progress=True,
                                       fast=fast))
    metrics.pop("fast", None)  # the metrics are numbers averaged over seeds; the path is round-off
    return metrics


def throughput(checkpoints: dict[str, str | Path], data: str | Path, batch_size: int, device: str) -> dict[str, float]:
    """Inference samples/s per model, in one interleaved measurement (see
    :func:`kdcache.evaluate.inference_throughput`)."""
    from kdcache.evaluate import inference_throughput

    return inference_throughput(checkpoints, data, batch_size=batch_size, device=device)


def collect(checkpoint: str | Path, data: str | Path, num_samples: int, batch_size: int, device: str,
            features: tuple[str, ...] = (K.NODE,)) -> tuple[dict, dict]:
    """Predictions and hidden features of a model on the first ``num_samples`` samples.

    Returns:
        ``(predictions, features)``: predictions hold ``energy_true/pred [S]``,
        ``forces_true/pred [N, 3]`` (physical units, free atoms only) and ``natoms``; features
        hold each requested key the model has, ``[N_all, ...]`` float32 in sample order.
    """
    from torch.utils.data import DataLoader, Subset

    from kdcache.train.data import collate

    model = load_model(checkpoint, device)
    model.eval()
    wanted = tuple(f for f in features if f in model.available_features)
    ds = open_dataset(data)
    n = min(num_samples, len(ds))
    loader = DataLoader(Subset(ds, range(n)), batch_size=batch_size, shuffle=False, collate_fn=collate)
    preds = {"energy_true": [], "energy_pred": [], "forces_true": [], "forces_pred": [], "natoms": []}
    feats: dict[str, list] = {f: [] for f in wanted}
    for batch in loader:
        batch = batch.to(device)
        with torch.no_grad():
            out = model.predict(batch, features=wanted)
        free = ~batch[K.FIXED].bool() if K.FIXED in batch else torch.ones_like(batch[K.ATOMIC_NUMBERS], dtype=torch.bool)
        preds["energy_true"].append(batch[K.ENERGY].double().cpu())
        preds["energy_pred"].append(out[K.ENERGY].detach().double().cpu())
        preds["forces_true"].append(batch[K.FORCES][free].double().cpu())
        preds["forces_pred"].append(out[K.FORCES][free].detach().double().cpu())
        preds["natoms"].append(batch[K.NATOMS].cpu())
        for f in wanted:
            feats[f].append(out[f].detach().float().cpu())
    cat = lambda xs: torch.cat(xs).numpy() if xs else np.zeros(0)  # noqa: E731
    return {k: cat(v) for k, v in preds.items()}, {k: cat(v) for k, v in feats.items()}
