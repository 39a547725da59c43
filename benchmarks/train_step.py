"""Time per training step of one student, on the same batches, three ways:

1. ``plain``  — energy + force loss only (no distillation);
2. ``cached`` — plus v2v against targets read from a feature store (offline KD, kdcache);
3. ``online`` — plus v2v against the teacher run on every batch (online KD, the original code).

A step = fetch the batch (structures, plus stored targets for ``cached``) + forward + backward +
clip + AdamW step + EMA update, i.e. what the trainer does. The three ways run interleaved, step
by step and in rotating order, so a busy machine slows them alike; medians are reported.

    python benchmarks/train_step.py --student painn-tiny --teacher gemnet-oc-tiny --steps 30

Data: the embedded demo generator (OC20-like slabs); the store is made by ``kdcache extract`` with
the (randomly initialised, for timing only) teacher preset. Results go to docs/benchmarks-train.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from kdcache import keys as K


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", default="painn-tiny")
    p.add_argument("--teacher", default="gemnet-oc-tiny")
    p.add_argument("--workdir", default="/tmp/kdcache-bench-train")
    p.add_argument("--num-train", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="float16", help="stored feature dtype")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


class Way:
    """One way of training: its own student, maps, optimiser and EMA (same initial weights)."""

    def __init__(self, name, args, store_key, d_teacher, probe, device, strategy):
        from kdcache.train.ema import EMA
        from kdcache.train.objective import DistillationObjective, build_maps, feature_widths
        from kdcache.train.strategies import parse_strategy
        from kdcache.train.trainer import build_student

        torch.manual_seed(0)
        student = build_student(args.student).to(device)
        terms = parse_strategy(strategy, 10.0)
        keys = {t.name: (store_key,) for t in terms}
        maps = build_maps(terms, feature_widths(student, probe, terms, keys), "linear") if terms else {}
        self.name = name
        self.objective = DistillationObjective(student, terms, keys, maps).to(device)
        self.opt = torch.optim.AdamW(self.objective.parameters(), lr=1e-4, amsgrad=True)
        self.ema = EMA(self.objective, 0.999)
        self.times: list[float] = []
        self.cpu: list[float] = []

    def step(self, batch) -> None:
        parts = self.objective(batch)
        self.opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.objective.parameters(), 10.0)
        self.opt.step()
        self.ema.update()


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from kdcache.data import open_dataset
    from kdcache.data.demo import write_demo
    from kdcache.models.presets import build_preset
    from kdcache.store import FeatureStore, LocalBatchSampler
    from kdcache.store.extract import extract
    from kdcache.train.data import JoinedDataset, collate, target_key
    from kdcache.train.distributed import pick_device

    device = pick_device(args.device)
    work = Path(args.workdir)
    data = work / "train.lmdb"
    if not data.exists():
        write_demo(work, num_train=args.num_train, num_val=2, num_test=2, seed=0)
    store_path = work / f"{args.teacher}-{args.dtype}.zarr"
    if not store_path.exists():
        extract(data, store_path, teacher=args.teacher, features=["e2v", "vector"] if "painn" in args.teacher else ["e2v"],
                dtype=args.dtype, batch_size=args.batch_size, device=str(device), progress=False)
    dataset = open_dataset(data)
    store = FeatureStore.open(store_path, dataset=dataset)
    store_key = K.VECTOR if "painn" in args.teacher else K.E2V

    torch.manual_seed(1)
    teacher = build_preset(args.teacher).to(device).eval()  # online KD only
    plain_ds = JoinedDataset(dataset)
    cached_ds = JoinedDataset(dataset, store, (store_key,))
    sampler = LocalBatchSampler(len(dataset), args.batch_size, shuffle=True, seed=0, drop_last=True)
    batches: list[tuple[int, list[int]]] = []  # (epoch, indices)
    epoch = 0
    while len(batches) < args.warmup + args.steps:  # more epochs if the data are few
        sampler.set_epoch(epoch)
        batches += [(epoch, b) for b in sampler][: args.warmup + args.steps - len(batches)]
        epoch += 1

    probe = collate(cached_ds.__getitems__(batches[0][1])).to(device)
    d_t = probe[target_key(store_key)].shape[-1]
    ways = [Way("plain", args, store_key, d_t, probe, device, "none"),
            Way("cached", args, store_key, d_t, probe, device, "v2v"),
            Way("online", args, store_key, d_t, probe, device, "v2v")]
    torch.use_deterministic_algorithms(True, warn_only=True)  # as the trainer (exact resume)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for i, (epoch, idx) in enumerate(batches):
        cached_ds.set_epoch(epoch)  # as the trainer: structure hashes are checked in epoch 0
        order = ways[i % 3:] + ways[: i % 3]
        for way in order:
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            if way.name == "cached":
                batch = collate(cached_ds.__getitems__(idx)).to(device)
            else:
                batch = collate(plain_ds.__getitems__(idx)).to(device)
            if way.name == "online":
                out = teacher(batch, features=(store_key,))
                batch[target_key(store_key)] = out[store_key].detach()
            way.step(batch)
            sync()
            if i >= args.warmup:
                way.times.append(time.perf_counter() - t0)
                way.cpu.append(time.process_time() - c0)

    med = {w.name: statistics.median(w.times) for w in ways}
    cpu = {w.name: statistics.median(w.cpu) for w in ways}
    result = {
        # CPU time of this process: on a shared machine less disturbed by other jobs than wall time
        "cpu_ms_per_step": {k: 1000 * v for k, v in cpu.items()},
        "cpu_cached_over_plain": cpu["cached"] / cpu["plain"],
        "cpu_online_over_plain": cpu["online"] / cpu["plain"],
        "student": args.student, "teacher": args.teacher, "batch_size": args.batch_size, "steps": args.steps,
        "device": str(device), "threads": torch.get_num_threads(), "stored_dtype": args.dtype,
        "ms_per_step": {k: 1000 * v for k, v in med.items()},
        "cached_over_plain": med["cached"] / med["plain"],
        "online_over_plain": med["online"] / med["plain"],
        "online_over_cached": med["online"] / med["cached"],
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"student {args.student}, teacher {args.teacher}, batch {args.batch_size}, {args.steps} steps, "
              f"device {device}, {torch.get_num_threads()} threads")
        for k, v in result["ms_per_step"].items():
            print(f"  {k:<7} {v:9.1f} ms/step (wall)   {result['cpu_ms_per_step'][k]:9.1f} ms/step (CPU)")
        print(f"  cached/plain  {result['cached_over_plain']:.3f} (wall)   {result['cpu_cached_over_plain']:.3f} (CPU)")
        print(f"  online/plain  {result['online_over_plain']:.3f} (wall)   {result['cpu_online_over_plain']:.3f} (CPU)")
        print(f"  online/cached {result['online_over_cached']:.3f}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
