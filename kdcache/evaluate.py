"""Accuracy and speed of a model on a dataset (``kdcache eval``; also the trainer's validation).

Metrics in physical units, forces on free atoms only when the data mark fixed atoms:
energy MAE (meV), force MAE (meV/Å, mean over free-atom components), force cosine (mean over
free atoms of the cosine between predicted and true force), EFwT (share of structures with
``|ΔE| < 0.02 eV`` and every free-atom force component within ``0.03 eV/Å``), force L2-MAE and
throughput (structures per second of model time).

Metrics are never NaN: labels that are missing or not finite are a ``DataError`` naming the file,
sample and field (from :func:`kdcache.data.collate`), and a model that predicts NaN or infinity is
a ``NumericalError`` naming the samples.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

from kdcache import keys as K
from kdcache.data.batch import LABELS, non_finite_error, sample_file
from kdcache.errors import ConfigError, NumericalError

EFWT_ENERGY = 0.02  # eV
EFWT_FORCE = 0.03  # eV/Å


class MetricSums:
    """Running sums over batches; :meth:`result` turns them into the reported metrics."""

    def __init__(self):
        self.structures = 0
        self.abs_e = 0.0
        self.free_atoms = 0
        self.abs_f = 0.0  # sum of |component| errors over free atoms
        self.l2_f = 0.0  # sum of per-atom error norms over free atoms
        self.cos = 0.0
        self.within = 0
        self.seconds = 0.0
        self.timed_structures = 0  # structures whose model time is in ``seconds``

    def add(self, pred_e, pred_f, true_e, true_f, batch_index, natoms, fixed=None) -> None:
        """Add one batch (physical units; tensors on any device)."""
        de = (pred_e.detach().double() - true_e.double()).abs()
        df = pred_f.detach().double() - true_f.double()
        free = torch.ones(df.shape[0], dtype=torch.bool, device=df.device) if fixed is None else ~fixed.bool()
        dff = df[free]
        self.structures += int(de.numel())
        self.abs_e += float(de.sum())
        self.free_atoms += int(free.sum())
        self.abs_f += float(dff.abs().sum())
        self.l2_f += float(torch.linalg.vector_norm(dff, dim=-1).sum())
        pf, tf = pred_f.detach().double()[free], true_f.double()[free]
        self.cos += float(torch.nn.functional.cosine_similarity(pf, tf, dim=-1, eps=1e-12).sum())
        # worst free-atom force component per structure (structures without free atoms: 0)
        worst = torch.zeros(de.numel(), dtype=df.dtype, device=df.device)
        if dff.numel():
            worst = worst.scatter_reduce_(0, batch_index[free], dff.abs().amax(dim=-1), reduce="amax", include_self=True)
        self.within += int(((de < EFWT_ENERGY) & (worst < EFWT_FORCE)).sum())

    def all_reduce(self, device: torch.device) -> None:
        """Sum the counts of every process (distributed validation on shards)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        names = sorted(vars(self))
        t = torch.tensor([float(getattr(self, n)) for n in names], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        for n, v in zip(names, t.tolist()):
            setattr(self, n, int(round(v)) if isinstance(getattr(self, n), int) else v)

    def result(self) -> dict[str, float]:
        s, a = max(self.structures, 1), max(self.free_atoms, 1)
        return {
            "energy_mae": 1000.0 * self.abs_e / s,
            "force_mae": 1000.0 * self.abs_f / (3 * a),
            "force_cos": self.cos / a,
            "efwt": self.within / s,
            "force_l2mae": 1000.0 * self.l2_f / a,
            "samples_per_s": self.timed_structures / self.seconds if self.seconds > 0 else math.nan,
            "num_samples": self.structures,
        }


def _predict(model, batch) -> dict:
    # Direct-force models need no autograd at inference; -dE/dpos models enable it themselves.
    with torch.no_grad():
        return model.predict(batch)


def evaluate_model(model, loader, device: torch.device | str | None = None, progress: bool = False) -> MetricSums:
    """Run ``model`` (in eval mode) over ``loader``'s batches and accumulate metrics.

    Args:
        model: a :class:`kdcache.models.base.PotentialModel`.
        loader: batches with energy and forces labels.
        device: where to run (default: the model's device).
        progress: show a progress bar.

    Raises:
        NumericalError: the model predicts NaN or infinity (naming the samples).
        DataError: a label is not finite (a ``LabelledLoader`` refuses them first).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = MetricSums()
    dtype = next(model.parameters()).dtype  # e.g. float64 reference checkpoints
    it = loader
    if progress:
        from tqdm import tqdm

        it = tqdm(loader, desc="eval", unit="batch", leave=False)
    # a compiled model compiles in its first call: that batch's time is not throughput
    untimed = 1 if getattr(model, "fast_path", None) is not None else 0
    try:
        for batch in it:
            batch = _on_device(batch, device, dtype)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            out = _predict(model, batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if untimed:
                untimed -= 1
            else:
                sums.seconds += time.perf_counter() - t0
                sums.timed_structures += int(batch[K.NATOMS].numel())
            sums.add(out[K.ENERGY], out[K.FORCES], batch[K.ENERGY], batch[K.FORCES], batch[K.BATCH],
                     batch[K.NATOMS], batch.get(K.FIXED) if hasattr(batch, "get") else None)
            # the sums were read as floats anyway: checking them costs nothing, and a NaN stays
            # in them from the batch that brought it
            if not (math.isfinite(sums.abs_e) and math.isfinite(sums.abs_f) and math.isfinite(sums.cos)):
                raise _non_finite(out, batch, getattr(loader, "dataset", None))
    finally:
        model.train(was_training)
    return sums


def _non_finite(out: dict, batch, dataset) -> Exception:
    """The error of a batch whose metrics came out NaN: a label (when the loader did not check
    them) or, else, the model's predictions, naming the samples by their dataset index."""
    index = batch[K.SAMPLE_INDEX].view(-1).tolist() if K.SAMPLE_INDEX in batch else list(range(batch.num_graphs))
    atom_sample = batch[K.BATCH]
    for field in LABELS:
        values = batch[field]
        bad = ~torch.isfinite(values)
        if bool(bad.any()):
            row = int(bad.reshape(values.shape[0], -1).any(dim=1).nonzero()[0, 0])
            pos = int(atom_sample[row]) if field == K.FORCES else row
            return non_finite_error(dataset, index[pos], field, int(bad.sum()), values.dtype)
    bad_atom = ~torch.isfinite(out[K.FORCES]).all(dim=-1)
    bad = ~torch.isfinite(out[K.ENERGY]).reshape(-1)
    bad = bad | (torch.zeros_like(bad, dtype=torch.long).index_add_(0, atom_sample, bad_atom.long()) > 0)
    samples = [index[int(i)] for i in bad.nonzero().reshape(-1)]
    where = sample_file(dataset, samples[0] if samples else None)
    return NumericalError(f"the model predicts NaN or infinite energies or forces for samples {samples} of {where}: "
                          "its weights are broken (a diverged run?) or these structures are far out of its range")


def load_model(checkpoint: str | Path, device: torch.device | str = "cpu", fast: bool = False):
    """A model from a kdcache or Open Catalyst checkpoint (EMA weights where present).

    Args:
        checkpoint: the file.
        device: where to put it.
        fast: the compiled path (:mod:`kdcache.models.fast`), else the eager model.
    """
    from kdcache.models.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint, device=device, fast=fast).model


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, batch_size: int = 16, device: str | None = None,
                        num_workers: int = 0, progress: bool = False, fast: bool | str = "auto") -> dict[str, float]:
    """Metrics of a checkpoint on a dataset (see the module docstring).

    Args:
        checkpoint: the model.
        data: the dataset.
        batch_size: structures per batch.
        device: where to run (default: cuda when present).
        num_workers: data-loader workers.
        progress: show a progress bar.
        fast: run the compiled path (:mod:`kdcache.models.fast`; its first batch, which
            compiles, is left out of the throughput); ``"auto"``: where the dataset is large
            enough for it to pay (:mod:`kdcache.models.fast_auto`; the choice is printed to
            stderr and returned as ``fast``).
    """
    from kdcache.data import open_dataset
    from kdcache.models.fast_auto import AUTO, decide_fast, eager_batch_seconds
    from kdcache.train.data import LabelledLoader
    from kdcache.distributed import pick_device

    dev = pick_device(device)
    model = load_model(checkpoint, dev)
    dataset = open_dataset(data)
    loader = LabelledLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)

    def time_batch() -> float:
        first = LabelledLoader(torch.utils.data.Subset(dataset, range(min(batch_size, len(dataset)))),
                               batch_size=batch_size, shuffle=False)
        batch = _on_device(next(iter(first)), dev, next(model.parameters()).dtype)
        model.eval()
        return eager_batch_seconds(lambda: _predict(model, batch), dev)

    decision = decide_fast(fast, model, "inference", len(loader), dev, time_batch)
    if fast == AUTO and not decision.quiet:
        print(f"eval: {decision.describe()}", file=sys.stderr)
    if decision.fast:
        from kdcache.models.fast import fast_model

        try:
            model = fast_model(model)
        except TypeError as exc:
            raise ConfigError(f"--fast: {exc}") from None
    return {**evaluate_model(model, loader, dev, progress=progress).result(), "fast": decision.fast}


def _on_device(batch, device: torch.device, dtype: torch.dtype):
    """A batch on ``device``, its positions and cell in the model's ``dtype``."""
    batch = batch.to(device)
    for key in (K.POSITIONS, K.CELL):
        if batch[key].is_floating_point() and batch[key].dtype != dtype:
            batch[key] = batch[key].to(dtype)
    return batch


def inference_throughput(checkpoints: dict[str, str | Path], data: str | Path, batch_size: int = 16,
                         device: str | None = None, repeats: int = 5, max_samples: int = 64) -> dict[str, float]:
    """Inference samples/s of several models, measured once each in interleaved repeats.

    Timing every evaluation separately gave figures that moved by 2x for copies of one model on
    a shared machine; here the models take turns (A B A B ...) on the same batches, after one
    warm-up pass each, and each figure is the median of ``repeats`` passes.

    Args:
        checkpoints: name -> checkpoint (e.g. one per architecture).
        data: dataset; its first ``max_samples`` samples are used.
        batch_size: structures per batch.
        device: where to run (default: cuda when present).
        repeats: timed passes per model.
        max_samples: samples per pass.
    """
    import statistics

    from kdcache.data import open_dataset
    from kdcache.train.data import LabelledLoader
    from kdcache.distributed import pick_device

    dev = pick_device(device)
    dataset = open_dataset(data)
    n = min(len(dataset), max_samples)
    loader = LabelledLoader(torch.utils.data.Subset(dataset, range(n)) if n < len(dataset) else dataset,
                            batch_size=batch_size, shuffle=False)
    batches = list(loader)
    models = {name: load_model(ckpt, dev) for name, ckpt in checkpoints.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for rep in range(repeats + 1):
        for name, model in models.items():
            sums = evaluate_model(model, batches, dev)
            if rep:  # pass 0 warms up (allocator, lazy set-up)
                times[name].append(sums.structures / sums.seconds)
    return {name: float(statistics.median(v)) for name, v in times.items()}


def format_table(metrics: dict[str, float]) -> str:
    rows = [
        ("energy MAE", f"{metrics['energy_mae']:.2f}", "meV"),
        ("force MAE", f"{metrics['force_mae']:.2f}", "meV/Å"),
        ("force cosine", f"{metrics['force_cos']:.4f}", ""),
        ("EFwT", f"{100 * metrics['efwt']:.2f}", "%"),
        ("throughput", f"{metrics['samples_per_s']:.1f}", "samples/s"),
        ("structures", f"{int(metrics.get('num_samples', 0))}", ""),
    ]
    if "fast" in metrics:
        rows.append(("compiled path", "yes" if metrics["fast"] else "no", ""))
    w = max(len(r[0]) for r in rows)
    v = max(len(r[1]) for r in rows)
    return "\n".join(f"{name:<{w}}  {val:>{v}} {unit}".rstrip() for name, val, unit in rows)
