"""Share of extraction time spent writing the store vs running the teacher.

Writes ``--samples`` demo frames (OC20-like slabs + adsorbates, EMT labels) to an LMDB, runs
``kdcache.store.extract`` with a randomly initialised preset (the OC20 ``gemnet-oc`` by default:
the real feature widths, node 256 + e2n 512 + e2v 3x512) and reports forward vs write time.
Shards are sized so that groups fill them, as in a full-size run (padding < 1 %).

    python benchmarks/extract_share.py --teacher gemnet-oc --samples 16 --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdcache.data.demo import demo_systems  # noqa: E402
from kdcache.data.lmdb_writer import write_lmdb  # noqa: E402
from kdcache.store import FeatureStore  # noqa: E402
from kdcache.store.extract import extract  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="gemnet-oc")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--shard-atoms", type=int, default=256)
    ap.add_argument("--chunk-atoms", type=int, default=64)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        data = work / "demo.lmdb"
        write_lmdb(data, demo_systems(args.samples, seed=0))
        t = time.perf_counter()
        res = extract(data, work / "s.zarr", teacher=args.teacher, dtype=args.dtype, batch_size=args.batch_size,
                      shard_atoms=args.shard_atoms, chunk_atoms=args.chunk_atoms, device=args.device, progress=False)
        wall = time.perf_counter() - t
        store = FeatureStore.open(work / "s.zarr")
        atoms = int(store.natoms.sum())
        stored = sum(p.stat().st_size for p in (work / "s.zarr").rglob("*") if p.is_file())
        out = {
            "teacher": args.teacher,
            "samples": store.num_samples,
            "atoms": atoms,
            "dtype": args.dtype,
            "seconds_forward": round(res.seconds_forward, 3),
            "seconds_write": round(res.seconds_write, 3),
            "seconds_waiting_for_writes": round(res.seconds_waiting_for_writes, 3),
            "write_share": round(res.write_share, 5),
            "write_share_if_not_overlapped": round(res.write_share_unoverlapped, 5),
            "forward_samples_per_s": round(store.num_samples / res.seconds_forward, 3),
            "store_bytes": stored,
            "bytes_per_atom_incl_padding": round(stored / atoms, 1),
            "write_MB_per_s": round(stored / res.seconds_write / 1e6, 1) if res.seconds_write else None,
            "wall_seconds_incl_setup": round(wall, 1),
        }
        print(json.dumps(out, indent=2))
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
