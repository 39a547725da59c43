"""Random-batch read throughput of OC20-sized GemNet-OC targets: FeatureStore vs np.memmap vs zarr.

Builds a synthetic store (features do not change read speed) of ``--atoms`` atoms in samples of
20-126 atoms (mean ~73, as OC20 S2EF), with node [256], e2n [512], e2v [3, 512] in ``--dtype`` and
atom_energy / forces in float32, then reads random batches of ``--batch-size`` samples into float32
tensors, warm (after one pass over the files), in one process.

    python benchmarks/store_read.py --atoms 200000 --dtype float16
    python benchmarks/store_read.py --atoms 200000 --dtype float16 --codec zstd --zarr-batches 5
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdcache import keys as K  # noqa: E402
from kdcache.store import FeatureStore, Layout, LocalBatchSampler, StoreWriter  # noqa: E402
from kdcache.store import format as F  # noqa: E402

SHAPES = {K.NODE: (256,), K.E2N: (512,), K.E2V: (3, 512), K.ATOM_ENERGY: (), K.FORCES: (3,)}


def build(path: Path, atoms: int, dtype: str, codec: str, shard_atoms: int, chunk_atoms: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    natoms = []
    while sum(natoms) < atoms:
        natoms.append(int(rng.integers(20, 127)))
    natoms = np.asarray(natoms)
    lay = Layout.plan(natoms, shard_atoms=shard_atoms, chunk_atoms=chunk_atoms)
    dtypes = {k: (dtype if k in F.HIDDEN_KEYS else "float32") for k in SHAPES}
    dtypes[K.ENERGY] = "float32"
    w = StoreWriter.create(path, lay, np.arange(len(natoms)), SHAPES, dtypes, request={}, provenance={"has_energy": True}, codec=codec)
    nbytes, secs = 0, 0.0
    for g in range(lay.num_groups):
        lo, hi = lay.group_atoms(g)
        rows = {}
        for k, s in SHAPES.items():
            x = torch.randn(hi - lo, *s, generator=torch.Generator().manual_seed(seed * 100003 + g))
            rows[k] = F.to_storage(x, dtypes[k])
            nbytes += rows[k].nbytes
        s = lay.group_samples(g)
        t = time.perf_counter()
        w.write_group(g, rows, np.zeros(len(s)), np.zeros(len(s), np.uint64))
        secs += time.perf_counter() - t
    w.finalize()
    return natoms, nbytes / secs


def flat_copy(store: FeatureStore, out_dir: Path) -> dict[str, np.memmap]:
    """The same stored bytes as one flat raw file per array (no padding, no index), as torch
    views of np.memmap."""
    maps = {}
    total = int(store.natoms.sum())
    for k in store.per_atom_keys:
        spec = store._specs[k]
        m = np.memmap(out_dir / f"{k}.raw", dtype=spec.dtype, mode="w+", shape=(total, *spec.row_shape))
        o = 0
        for r in range(store.num_samples):
            n = int(store.natoms[r])
            a = int(store.atom_start[r])
            s, off = divmod(a, spec.shard_atoms)
            m[o : o + n] = store._shard(k, s)[off : off + n]
            o += n
        m.flush()
        view = np.memmap(out_dir / f"{k}.raw", dtype=spec.dtype, mode="r", shape=(total, *spec.row_shape)).view(np.ndarray)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bf16 = store.dtypes.get(k) == "bfloat16"
            maps[k] = torch.from_numpy(view.view(np.int16)).view(torch.bfloat16) if bf16 else torch.from_numpy(view)
    return maps


def memmap_read(maps, starts, natoms, rows, bf16: set[str]):
    """The baseline: the same bytes as flat memmaps, gathered the same way as the store (torch
    copies each sample's rows straight into a float32 output, widening on the fly)."""
    out = {}
    n = natoms[rows]
    total = int(n.sum())
    for k, t in maps.items():
        wide = torch.from_numpy(np.empty((total, *t.shape[1:]), dtype=np.float32))
        o = 0
        for a, c in zip(starts[rows].tolist(), n.tolist()):
            wide[o : o + c].copy_(t[a : a + c])
            o += c
        out[k] = wide
    return out


def timed(fn, batches) -> float:
    t = time.perf_counter()
    n = 0
    for b in batches:
        fn(b)
        n += len(b)
    return n / (time.perf_counter() - t)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--atoms", type=int, default=200_000)
    ap.add_argument("--dtype", default="float16", choices=F.FEATURE_DTYPES)
    ap.add_argument("--codec", default="none", choices=F.CODECS)
    ap.add_argument("--shard-atoms", type=int, default=F.DEFAULT_SHARD_ATOMS)
    ap.add_argument("--chunk-atoms", type=int, default=F.DEFAULT_CHUNK_ATOMS)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--zarr-batches", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median reported)")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        path = work / "bench.zarr"
        natoms, write_bps = build(path, args.atoms, args.dtype, args.codec, args.shard_atoms, args.chunk_atoms)
        store = FeatureStore.open(path)
        n = store.num_samples
        rng = np.random.default_rng(1)
        rand = [rng.choice(n, args.batch_size, replace=False) for _ in range(args.batches)]
        local = [b for _, b in zip(range(args.batches), iter(LocalBatchSampler(n, args.batch_size, window=1024, seed=1)))]
        store.read(np.arange(n))  # warm: page cache + maps
        res = {
            "atoms": int(natoms.sum()),
            "samples": n,
            "dtype": args.dtype,
            "codec": args.codec,
            "batch_size": args.batch_size,
            "store_bytes_per_atom_incl_padding": sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / int(natoms.sum()),
            "stored_bytes_per_atom_excl_padding": sum(s.dtype.itemsize * int(np.prod(s.row_shape)) for s in store._specs.values()),
            "padding_fraction": 1 - int(natoms.sum()) / store.provenance["layout"]["atom_axis"],
            "write_group_MB_per_s": write_bps / 1e6,
        }
        methods = {
            "featurestore_random_samples_per_s": (store.read, rand),
            "featurestore_local_samples_per_s": (store.read, local),
            "featurestore_random_stored_dtype_samples_per_s": (lambda b: store.read(b, dtype=None), rand),
        }
        if args.codec == "none":
            maps = flat_copy(store, work)
            starts = np.concatenate([[0], np.cumsum(store.natoms)[:-1]])
            bf16 = {k for k in maps if store.dtypes.get(k) == "bfloat16"}
            memmap_read(maps, starts, store.natoms, np.arange(n), bf16)  # warm
            methods["np_memmap_random_samples_per_s"] = (lambda b: memmap_read(maps, starts, store.natoms, b, bf16), rand)
        # the machine is shared: interleave the methods in rounds and keep each one's median
        rounds = max(1, args.rounds)
        got: dict[str, list[float]] = {k: [] for k in methods}
        for r in range(rounds):
            for name, (fn, batches) in methods.items():
                per = max(1, len(batches) // rounds)
                got[name].append(timed(fn, batches[r * per : (r + 1) * per]))
        for name, vals in got.items():
            res[name] = float(np.median(vals))
        if args.zarr_batches:
            import zarr

            root = zarr.open_group(str(path), mode="r")
            arrs = {k: root[k] for k in store.per_atom_keys}

            def zarr_read(rows):
                for r in rows:
                    a, c = int(store.atom_start[r]), int(store.natoms[r])
                    for arr in arrs.values():
                        np.asarray(arr[a : a + c], dtype=np.float32)

            res["zarr_python_random_samples_per_s"] = timed(zarr_read, rand[: args.zarr_batches])
        print(json.dumps(res, indent=2))
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
