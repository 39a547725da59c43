"""Bytes per atom of each feature dtype x codec, and what compression costs in read speed.

Teacher features: a randomly initialised ``--teacher`` (default gemnet-oc-tiny) on demo frames,
plus Gaussian noise as a worst case. Each feature matrix is written as a sharded zarr array (inner
chunks of 128 atoms) in float16 / bfloat16 / float32 with no codec, zstd (level 3) and blosc-lz4
(bitshuffle); the stored size per value is scaled to OC20 GemNet-OC widths (node 256 + e2n 512 +
e2v 3x512 = 2304 values per atom).

    python benchmarks/store_bytes.py --samples 24
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
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdcache import keys as K  # noqa: E402
from kdcache.store import format as F  # noqa: E402
from kdcache.store.writer import _codec_objects  # noqa: E402

OC20_VALUES_PER_ATOM = 256 + 512 + 3 * 512


def teacher_features(teacher: str, samples: int) -> dict[str, np.ndarray]:
    from torch_geometric.data import Batch

    from kdcache.data.demo import demo_systems
    from kdcache.data.lmdb_writer import write_lmdb
    from kdcache.models.presets import build_preset
    from kdcache.data import open_dataset
    from kdcache.store.extract import set_teacher_dtype

    work = Path(tempfile.mkdtemp())
    try:
        write_lmdb(work / "d.lmdb", demo_systems(samples, seed=0))
        ds = open_dataset(work / "d.lmdb")
        torch.manual_seed(0)
        model = set_teacher_dtype(build_preset(teacher).eval(), "float32")
        for p in model.parameters():
            p.requires_grad_(False)
        feats = [k for k in (K.NODE, K.E2N, K.E2V, K.VECTOR) if k in model.available_features]
        outs: dict[str, list] = {k: [] for k in feats}
        for b0 in range(0, samples, 8):
            pred = model.predict(Batch.from_data_list([ds[i] for i in range(b0, min(samples, b0 + 8))]), feats)
            for k in feats:
                outs[k].append(pred[k].detach().reshape(pred[k].shape[0], -1).numpy())
        return {k: np.concatenate(v) for k, v in outs.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(x: np.ndarray, dtype: str, codec: str, work: Path) -> tuple[float, float]:
    """(stored bytes per value, seconds per full read through zarr) of ``x`` [A, d]."""
    a = (x.shape[0] // 128) * 128
    x = x[:a]
    path = work / f"{x.shape[1]}-{dtype}-{codec}-{time.perf_counter_ns()}.zarr"
    arr = zarr.create_array(str(path), shape=x.shape, shards=(a, x.shape[1]), chunks=(128, x.shape[1]),
                            dtype=F.storage_dtype(dtype), compressors=_codec_objects(codec), fill_value=0)
    arr[:] = F.to_storage(torch.from_numpy(x), dtype)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != "zarr.json")
    t = time.perf_counter()
    for _ in range(3):
        np.asarray(arr[:])
    return size / x.size, (time.perf_counter() - t) / 3


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="gemnet-oc-tiny")
    ap.add_argument("--samples", type=int, default=24)
    args = ap.parse_args(argv)
    feats = teacher_features(args.teacher, args.samples)
    rng = np.random.default_rng(0)
    feats["gaussian_noise"] = rng.standard_normal((4096, 256)).astype(np.float32)
    work = Path(tempfile.mkdtemp())
    rows = []
    try:
        for name, x in feats.items():
            for dtype in F.FEATURE_DTYPES:
                base = None
                for codec in F.CODECS:
                    bpv, secs = measure(x, dtype, codec, work)
                    base = base or secs
                    rows.append({
                        "features": name, "dtype": dtype, "codec": codec,
                        "bytes_per_value": round(bpv, 4),
                        "saving_vs_raw": round(1 - bpv / np.dtype(F.storage_dtype(dtype)).itemsize, 4),
                        "oc20_gemnet_bytes_per_atom": round(bpv * OC20_VALUES_PER_ATOM),
                        "zarr_read_slowdown_vs_none": round(secs / base, 2),
                    })
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for r in rows:
        print(json.dumps(r))
    return {"rows": rows}


if __name__ == "__main__":
    main()
