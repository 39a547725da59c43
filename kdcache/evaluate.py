"""Accuracy and speed of a model on a dataset (``kdcache eval``; also the trainer's validation).

Metrics in physical units, forces on free atoms only when the data mark fixed atoms:
energy MAE (meV), force MAE (meV/Å, mean over free-atom components), force cosine (mean over
free atoms of the cosine between predicted and true force), EFwT (share of structures with
``|ΔE| < 0.02 eV`` and every free-atom force component within ``0.03 eV/Å``), force L2-MAE and
throughput (structures per second of model time).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from kdcache import keys as K

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

    def merge(self, other: "MetricSums") -> None:
        for k, v in vars(other).items():
            setattr(self, k, getattr(self, k) + v)

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
            "samples_per_s": self.structures / self.seconds if self.seconds > 0 else math.nan,
            "num_samples": self.structures,
        }


def _predict(model, batch) -> dict:
    # Direct-force models need no autograd at inference; -dE/dpos models enable it themselves.
    with torch.no_grad():
        return model.predict(batch)


def evaluate_model(model, loader, device: torch.device | str | None = None, progress: bool = False) -> MetricSums:
    """Run ``model`` (in eval mode) over ``loader``'s batches and accumulate metrics."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = MetricSums()
    dtype = next(model.parameters()).dtype  # e.g. float64 reference checkpoints
    it = loader
    if progress:
        from tqdm import tqdm

        it = tqdm(loader, desc="eval", unit="batch", leave=False)
    try:
        for batch in it:
            batch = batch.to(device)
            for key in (K.POSITIONS, K.CELL):
                if batch[key].is_floating_point() and batch[key].dtype != dtype:
                    batch[key] = batch[key].to(dtype)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            out = _predict(model, batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            sums.seconds += time.perf_counter() - t0
            sums.add(out[K.ENERGY], out[K.FORCES], batch[K.ENERGY], batch[K.FORCES], batch[K.BATCH],
                     batch[K.NATOMS], batch.get(K.FIXED) if hasattr(batch, "get") else None)
    finally:
        model.train(was_training)
    return sums


def load_model(checkpoint: str | Path, device: torch.device | str = "cpu"):
    """A model from a kdcache or Open Catalyst checkpoint (EMA weights where present)."""
    from kdcache.models.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    model = loaded[0] if isinstance(loaded, tuple) else getattr(loaded, "model", loaded)
    return model.to(device)


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, batch_size: int = 16, device: str | None = None,
                        num_workers: int = 0, progress: bool = False) -> dict[str, float]:
    """Metrics of a checkpoint on a dataset (see the module docstring)."""
    from torch.utils.data import DataLoader

    from kdcache.data import open_dataset
    from kdcache.train.data import collate
    from kdcache.train.distributed import pick_device

    dev = pick_device(device)
    model = load_model(checkpoint, dev)
    dataset = open_dataset(data)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=num_workers)
    return evaluate_model(model, loader, dev, progress=progress).result()


def format_table(metrics: dict[str, float]) -> str:
    rows = [
        ("energy MAE", f"{metrics['energy_mae']:.2f}", "meV"),
        ("force MAE", f"{metrics['force_mae']:.2f}", "meV/Å"),
        ("force cosine", f"{metrics['force_cos']:.4f}", ""),
        ("EFwT", f"{100 * metrics['efwt']:.2f}", "%"),
        ("throughput", f"{metrics['samples_per_s']:.1f}", "samples/s"),
        ("structures", f"{int(metrics.get('num_samples', 0))}", ""),
    ]
    w = max(len(r[0]) for r in rows)
    v = max(len(r[1]) for r in rows)
    return "\n".join(f"{name:<{w}}  {val:>{v}} {unit}".rstrip() for name, val, unit in rows)
