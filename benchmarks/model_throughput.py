"""Inference throughput (samples/s) of the model presets on a fixed set of OC20-like structures.

The structures are built deterministically: fcc(111) slabs of Cu, Pt, Ag or Pd (3x3 or 4x4, four
or five layers, 10-15 Å vacuum, rattled) with a small adsorbate (O, OH, CO, CH3, H2O), tags 0/1/2
and FixAtoms on the subsurface, as OC20 S2EF samples (46-84 atoms, mean ~66; OC20's is ~73). Timing covers the whole
forward pass (graph construction included), energies and forces as the model produces them,
``torch.no_grad`` (gradient-force models enable gradients inside), after warm-up batches.

    python benchmarks/model_throughput.py                         # tiny + OC20 students on CPU
    python benchmarks/model_throughput.py --presets gemnet-oc painn-big --structures 8 --batch-size 4
    python benchmarks/model_throughput.py --device cuda            # every preset, CUDA

Figures are recorded in docs/benchmarks-models.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdcache.calculator import atoms_to_batch  # noqa: E402
from kdcache.models.presets import PRESETS, build_preset, count_parameters  # noqa: E402

DEFAULT_CPU = ["painn-tiny", "schnet-tiny", "gemnet-oc-tiny", "schnet", "painn-small", "painn-big"]
ADSORBATES = ["O", "OH", "CO", "CH3", "H2O"]


def oc20_like(num: int, seed: int = 0) -> list:
    """``num`` slab + adsorbate structures (ASE ``Atoms``), the same for a given seed."""
    from ase.build import add_adsorbate, fcc111, molecule
    from ase.constraints import FixAtoms

    rng = np.random.default_rng(seed)
    out = []
    for i in range(num):
        metal = ["Cu", "Pt", "Ag", "Pd"][i % 4]
        size = [(4, 4, 4), (4, 4, 5), (3, 3, 5), (4, 4, 4)][i % 4]
        slab = fcc111(metal, size=size, vacuum=float(rng.uniform(10, 15)), periodic=True)
        layer_tags = slab.get_tags()  # 1 = top layer ... n = bottom layer (ASE)
        tags = np.where(layer_tags == 1, 1, 0)
        name = ADSORBATES[i % len(ADSORBATES)]
        ads = molecule(name) if len(name) > 1 else None
        if ads is None:
            add_adsorbate(slab, name, height=1.8, position=(float(rng.uniform(0, 2)), float(rng.uniform(0, 2))))
        else:
            add_adsorbate(slab, ads, height=2.0, position=(float(rng.uniform(0, 2)), float(rng.uniform(0, 2))))
        tags = np.concatenate([tags, np.full(len(slab) - len(tags), 2)])
        slab.set_tags(tags)
        slab.rattle(stdev=0.05, seed=seed * 1000 + i)
        slab.set_constraint(FixAtoms(indices=np.nonzero(tags == 0)[0]))
        out.append(slab)
    return out


def batches(structures, batch_size: int, dtype, device):
    from torch_geometric.data import Batch

    singles = [atoms_to_batch(a, dtype=dtype, device="cpu") for a in structures]
    out = []
    for i in range(0, len(singles), batch_size):
        datas = [b.get_example(0) for b in singles[i : i + batch_size]]
        out.append(Batch.from_data_list(datas).to(device))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, structures, batch_size: int, device: torch.device, dtype, warmup: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = build_preset(name).to(device=device, dtype=dtype).eval()
    data = batches(structures, batch_size, dtype, device)
    with torch.no_grad():
        for b in data[:warmup]:
            model(b)
        _sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            for b in data:
                model(b)
        _sync(device)
        elapsed = time.perf_counter() - start
    n = repeats * len(structures)
    return {
        "preset": name,
        "model": PRESETS[name][0],
        "params_M": round(count_parameters(name) / 1e6, 2),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "batch_size": batch_size,
        "samples": n,
        "seconds": round(elapsed, 3),
        "samples_per_s": round(n / elapsed, 2),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=None, help=f"default on CPU: {DEFAULT_CPU}; on CUDA: all")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu, and cuda too when present)")
    p.add_argument("--structures", type=int, default=16, help="OC20-like structures in the fixed set")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1, help="passes over the set that are timed")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches first")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print one JSON line per result")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    devices = [torch.device(args.device)] if args.device else [torch.device("cpu")] + (
        [torch.device("cuda")] if torch.cuda.is_available() else []
    )
    structures = oc20_like(args.structures)
    natoms = [len(a) for a in structures]
    print(
        f"# {len(structures)} OC20-like structures, {min(natoms)}-{max(natoms)} atoms (mean {np.mean(natoms):.1f}); "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    for device in devices:
        names = args.presets or (DEFAULT_CPU if device.type == "cpu" else list(PRESETS))
        for name in names:
            if name not in PRESETS:
                print(f"unknown preset {name!r}; known: {sorted(PRESETS)}", file=sys.stderr)
                return 2
            res = measure(name, structures, args.batch_size, device, dtype, args.warmup, args.repeats)
            if args.json:
                print(json.dumps(res))
            else:
                print(
                    f"{res['preset']:<18} {res['params_M']:>7.2f} M  {res['device']:<6} {res['dtype']:<8} "
                    f"batch {res['batch_size']:<3} {res['samples_per_s']:>9.2f} samples/s  ({res['seconds']} s)"
                )
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
