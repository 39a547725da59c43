"""Do float16 teacher targets change the distilled student's accuracy, versus float32 targets?

One tiny GemNet-OC teacher (trained here briefly, or ``--teacher CKPT``) is extracted twice over
the same demo training split, once with ``--dtype float16`` and once with ``float32``. The script
reports how far the two stores' hidden features differ, then trains the same PaiNN-tiny student
(same seed, steps and strategy ``n2n:10,v2v:1``) on each store and evaluates both on the test
split. A single seed on a few hundred demo frames: the difference is noisy, read it as "same
order or not", not as a precise number.

    python benchmarks/store_dtype_accuracy.py --out /tmp/kd_dtype           # ~2 min on 2 cores
    python benchmarks/store_dtype_accuracy.py --out /tmp/kd_dtype_big --num-train 240 --num-val 48 \
        --num-test 96 --teacher-steps 600 --student-steps 200 --noise-seeds 2   # demo.yaml sizes, ~5 min
    python benchmarks/store_dtype_accuracy.py --teacher-steps 20 --student-steps 20   # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdcache import keys as K  # noqa: E402

# the demo pipeline's teacher (pipelines/demo.yaml): fewer neighbours than the preset, ~3x cheaper
TEACHER_OVERRIDES = {"max_neighbors": 12, "max_neighbors_qint": 4, "max_neighbors_aeaint": 8, "max_neighbors_aint": 12}
STRATEGY = "n2n:10,v2v:1"  # the demo's lambdas for n2n and v2v


def _train(settings: dict, out: Path) -> Path:
    from kdcache.pipeline.backends import train

    res = train({"progress": False, **settings}, out, "cpu")
    return out / res["checkpoint"]


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def store_stats(path: Path) -> dict:
    """Stored bytes per atom: whole store folder, and per hidden-feature array."""
    from kdcache.store import FeatureStore

    st = FeatureStore.open(path)
    atoms = int(st.natoms.sum())
    out = {"atoms": atoms, "total": _dir_bytes(path) / atoms}
    for key in st.per_atom_keys:
        if (path / key).is_dir():
            out[key] = _dir_bytes(path / key) / atoms
    return out


def compare_stores(a: Path, b: Path, keys=(K.NODE, K.E2N, K.E2V)) -> dict:
    """Max / mean relative difference of ``a`` (float16) against ``b`` (float32), per key.

    ``max_rel``: max |a-b| / max |b| (relative to the array's scale, since near-zero entries
    make element-wise ratios meaningless); ``mean_rel``: mean |a-b| / mean |b|.
    """
    from kdcache.store import FeatureStore

    sa, sb = FeatureStore.open(a), FeatureStore.open(b)
    idx = np.arange(sb.num_samples)
    res = {}
    for key in keys:
        if key not in sa.per_atom_keys or key not in sb.per_atom_keys:
            continue
        ta = sa.read_rows(idx, (key,))[key].double()
        tb = sb.read_rows(idx, (key,))[key].double()
        d = (ta - tb).abs()
        res[key] = {"max_rel": float(d.max() / tb.abs().max()), "mean_rel": float(d.mean() / tb.abs().mean()),
                    "max_abs": float(d.max()), "shape": tuple(tb.shape)}
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="work folder (default: a new temp folder)")
    p.add_argument("--teacher", type=Path, default=None, help="teacher checkpoint (skip teacher training)")
    p.add_argument("--num-train", type=int, default=160)
    p.add_argument("--num-val", type=int, default=24)
    p.add_argument("--num-test", type=int, default=48)
    p.add_argument("--teacher-steps", type=int, default=150)
    p.add_argument("--student-steps", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise-seeds", type=int, default=1,
                   help="extra float32 students with seeds seed+1.. : the seed-to-seed spread, for scale")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    from kdcache.data.demo import write_demo
    from kdcache.evaluate import evaluate_checkpoint
    from kdcache.pipeline.backends import extract

    work = args.out or Path(tempfile.mkdtemp(prefix="kd_dtype_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    times = {}

    data = work / "data"
    if not (data / "test.lmdb").exists():
        write_demo(data, args.num_train, args.num_val, args.num_test, seed=args.seed, workers=1)
    train_p, val_p, test_p = (str(data / f"{s}.lmdb") for s in ("train", "val", "test"))
    times["data"] = time.perf_counter() - t0

    t = time.perf_counter()
    if args.teacher is not None:
        teacher = args.teacher
    else:
        m1, m2 = int(args.teacher_steps * 0.6), int(args.teacher_steps * 0.85)
        teacher = _train({"student": "gemnet-oc-tiny", "student_overrides": TEACHER_OVERRIDES, "data": train_p,
                          "val": val_p, "strategy": "none", "max_steps": args.teacher_steps, "batch_size": 4,
                          "lr": 2e-3, "scheduler": "warmup_step", "lr_milestones": [m1, m2], "lr_gamma": 0.3,
                          "energy_coef": 1.0, "force_coef": 10.0, "eval_every": max(1, args.teacher_steps // 3),
                          "deterministic": False, "seed": args.seed}, work / "teacher")
    times["teacher"] = time.perf_counter() - t

    stores = {}
    for dtype in ("float16", "float32"):
        t = time.perf_counter()
        stores[dtype] = work / f"store_{dtype}" / "teacher.zarr"
        if not stores[dtype].exists():
            extract(teacher, "gemnet-oc-tiny", train_p, stores[dtype], (K.NODE, K.E2N, K.E2V), dtype, 8, "cpu",
                    {"progress": False})
        times[f"extract {dtype}"] = time.perf_counter() - t
    diff = compare_stores(stores["float16"], stores["float32"])

    metrics = {}
    m1, m2 = int(args.student_steps * 0.6), int(args.student_steps * 0.85)
    student = {"student": "painn-tiny", "data": train_p, "val": val_p, "strategy": STRATEGY,
               "max_steps": args.student_steps, "batch_size": 8, "lr": 2e-3, "scheduler": "warmup_step",
               "lr_milestones": [m1, m2], "lr_gamma": 0.3, "energy_coef": 1.0, "force_coef": 10.0,
               "eval_every": max(1, args.student_steps // 6), "seed": args.seed}
    for dtype, store in stores.items():
        t = time.perf_counter()
        ckpt = _train({**student, "store": str(store)}, work / f"student_{dtype}")
        metrics[dtype] = evaluate_checkpoint(ckpt, test_p, batch_size=8, device="cpu")
        times[f"student {dtype}"] = time.perf_counter() - t
    for k in range(1, args.noise_seeds + 1):
        t = time.perf_counter()
        ckpt = _train({**student, "store": str(stores["float32"]), "seed": args.seed + k}, work / f"student_float32_seed{k}")
        metrics[f"float32, seed {args.seed + k}"] = evaluate_checkpoint(ckpt, test_p, batch_size=8, device="cpu")
        times[f"student float32 seed {args.seed + k}"] = time.perf_counter() - t
    teacher_m = evaluate_checkpoint(teacher, test_p, batch_size=8, device="cpu")

    print(f"work folder: {work}")
    print(f"data: {args.num_train}/{args.num_val}/{args.num_test} demo frames, seed {args.seed}; "
          f"teacher: {'given ' + str(args.teacher) if args.teacher else f'gemnet-oc-tiny, {args.teacher_steps} steps'}; "
          f"students: painn-tiny, {STRATEGY}, {args.student_steps} steps, seed {args.seed}")
    print("\nstored features, float16 vs float32 store (same teacher, same frames):")
    print("| feature | shape | max rel. diff | mean rel. diff | max abs. diff |")
    print("|---|---|---|---|---|")
    for key, d in diff.items():
        print(f"| {key} | {list(d['shape'])} | {d['max_rel']:.2e} | {d['mean_rel']:.2e} | {d['max_abs']:.2e} |")
    print("\nstore size (bytes per atom, on disk):")
    print("| store | total | " + " | ".join(diff) + " |")
    print("|---|---|" + "---|" * len(diff))
    for dtype, store in stores.items():
        s = store_stats(store)
        print(f"| {dtype} | {s['total']:.0f} | " + " | ".join(f"{s.get(k, float('nan')):.0f}" for k in diff) + " |")
    print(f"\ntest metrics ({args.num_test} frames; teacher: energy MAE {teacher_m['energy_mae']:.1f} meV, "
          f"force MAE {teacher_m['force_mae']:.1f} meV/Å):")
    print("| student targets | energy MAE (meV) | force MAE (meV/Å) | force cos |")
    print("|---|---|---|---|")
    for dtype in ("float16", "float32"):
        m = metrics[dtype]
        print(f"| {dtype} | {m['energy_mae']:.2f} | {m['force_mae']:.2f} | {m.get('force_cos', float('nan')):.4f} |")
    a, b = metrics["float16"], metrics["float32"]
    print(f"| float16 - float32 | {a['energy_mae'] - b['energy_mae']:+.2f} "
          f"({100 * (a['energy_mae'] / b['energy_mae'] - 1):+.1f} %) | {a['force_mae'] - b['force_mae']:+.2f} "
          f"({100 * (a['force_mae'] / b['force_mae'] - 1):+.1f} %) | "
          f"{a.get('force_cos', float('nan')) - b.get('force_cos', float('nan')):+.4f} |")
    for name, m in metrics.items():
        if name.startswith("float32, seed"):
            print(f"| {name} (spread reference) | {m['energy_mae']:.2f} | {m['force_mae']:.2f} | "
                  f"{m.get('force_cos', float('nan')):.4f} |")
    print("\ntimes (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())
          + f", total {time.perf_counter() - t0:.0f}")


if __name__ == "__main__":
    main()
