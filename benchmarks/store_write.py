"""Write throughput of whole groups (one full 64 k-atom shard of OC20 GemNet-OC targets each):
kdcache's direct shard writer vs zarr's sharding codec, and what it means for extraction.

    python benchmarks/store_write.py --groups 3 --dtype float16

The figure to compare with a teacher: a GPU GemNet-OC producing R samples/s of ~73 atoms needs
R * 73 * bytes_per_atom of writing; since writes run in a background thread, the forward loop
only waits for them when that exceeds the writer's rate.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdcache import keys as K  # noqa: E402
from kdcache.store import Layout, StoreWriter  # noqa: E402
from kdcache.store import format as F  # noqa: E402

SHAPES = {K.NODE: (256,), K.E2N: (512,), K.E2V: (3, 512), K.ATOM_ENERGY: (), K.FORCES: (3,)}


def run(groups: int, dtype: str, zarr_writes: bool, work: Path) -> dict:
    natoms = np.full(groups * (F.DEFAULT_SHARD_ATOMS // 73), 73)
    lay = Layout.plan(natoms)
    dtypes = {k: (dtype if k in F.HIDDEN_KEYS else "float32") for k in SHAPES}
    dtypes[K.ENERGY] = "float32"
    path = work / f"w-{int(zarr_writes)}.zarr"
    w = StoreWriter.create(path, lay, np.arange(len(natoms)), SHAPES, dtypes, request={})
    rows = {k: F.to_storage(torch.randn(F.DEFAULT_SHARD_ATOMS, *s), dtypes[k]) for k, s in SHAPES.items()}
    nbytes = sum(r.nbytes for r in rows.values())
    w.raw_shard_writes = not zarr_writes
    t = time.perf_counter()
    for g in range(lay.num_groups):
        s = lay.group_samples(g)
        w.write_group(g, rows, np.zeros(len(s)), np.zeros(len(s), np.uint64))
    secs = time.perf_counter() - t
    shutil.rmtree(path)
    mbps = lay.num_groups * nbytes / secs / 1e6
    return {
        "writer": "zarr" if zarr_writes else "kdcache-direct",
        "dtype": dtype,
        "groups": lay.num_groups,
        "MB_per_group": round(nbytes / 1e6, 1),
        "write_MB_per_s": round(mbps, 1),
        "oc20_samples_per_s_writable": round(mbps * 1e6 / (nbytes / F.DEFAULT_SHARD_ATOMS) / 73),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=3)
    ap.add_argument("--dtype", default="float16", choices=F.FEATURE_DTYPES)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        for zw in (False, True):
            print(json.dumps(run(args.groups, args.dtype, zw, work)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
