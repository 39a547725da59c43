"""MD steps/s through the ASE calculator: kdcache as it was at a git revision ("today") vs now.

Issue 12 asks for MD at 2x *today's* steps/s, today being the day it was filed. The eager path
of this checkout is not that: work on the issue made it faster too (the neighbour-list refine,
the cached batch), so ``model_throughput.py --sections md``, which compares with this checkout's
eager calculator at ``skin=0``, understates the gain. This script runs the calculator of the
revision itself.

Two code versions cannot share one process (both are the package ``kdcache``), so each way runs in
a worker process of its own, started once and kept warm: the revision, exported with
``git archive`` into a temporary directory, and this checkout. The driver asks them in turn for
one block of MD steps (A B A B ..., only one of them working at a time) and takes the time each
worker measured around its block. Both start from the same weights (built and scaled here, then
loaded strictly into each worker's model, so a renamed parameter stops the run), the same
structure and the same velocities; the positions after the warm-up block are compared, so a
difference in physics shows.

    python benchmarks/md_today.py                                   # SchNet, pyrazine dimer, 1 thread
    python benchmarks/md_today.py --presets schnet painn-small --structures slab molecule --threads 1 2
    python benchmarks/md_today.py --today 3847b25 --now fast --json
    python benchmarks/md_today.py --today HEAD --today-fast          # a change to the fast path, A/B

``--now``: ``fast`` (this checkout's ``KDCacheCalculator(model, fast=True)``, its default skin) or
``eager`` (this checkout's eager calculator with ``skin=0``, the baseline of model_throughput.py;
"eager" against "today" says how much of the gain the eager path got). Figures: docs/benchmarks-models.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: the last commit before any issue-12 work reached the calculator (f19db59 added the fast path
#: and the neighbour list to it): the calculator the issue measured as "today"
TODAY = "3847b25"

# --- worker: runs in a process whose ``kdcache`` is one code version ------------------------------

def _worker(root: str, way: str, preset: str, start_file: str, threads: int, weights: str) -> None:
    """Answer ``{"steps": n}`` lines on stdin with one timed MD block each (JSON on stdout)."""
    sys.path.insert(0, root)
    import torch

    torch.set_num_threads(threads)
    import kdcache
    from ase import units
    from ase.md.verlet import VelocityVerlet
    from kdcache.calculator import KDCacheCalculator
    from kdcache.models.presets import build_preset

    if not Path(kdcache.__file__).resolve().is_relative_to(Path(root).resolve()):
        raise SystemExit(f"worker imported kdcache from {kdcache.__file__}, not from {root}")
    model = build_preset(preset)
    model.load_state_dict(torch.load(weights, weights_only=True), strict=True)
    model.eval()
    if way == "today":
        calc = KDCacheCalculator(model)  # the calculator's defaults at that revision
    elif way == "today-fast":
        calc = KDCacheCalculator(model, fast=True)  # the revision's compiled path
    elif way == "eager":
        calc = KDCacheCalculator(model, fast=False, skin=0.0)
    else:
        calc = KDCacheCalculator(model, fast=True)
    start, velocities = _load_start(start_file)
    print(json.dumps({"ready": True, "kdcache": kdcache.__file__}), flush=True)
    for line in sys.stdin:
        steps = int(json.loads(line)["steps"])
        atoms = start.copy()
        atoms.set_velocities(velocities)
        atoms.calc = calc
        w0, c0 = time.perf_counter(), time.process_time()
        VelocityVerlet(atoms, timestep=1.0 * units.fs).run(steps)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        print(json.dumps({"wall": wall, "cpu": cpu, "positions": atoms.positions.tolist()}), flush=True)


def _load_start(path: str):
    """The start structure and velocities written by :func:`_save_start` (plain JSON: both workers
    read it with their own code)."""
    import numpy as np
    from ase import Atoms
    from ase.constraints import FixAtoms

    d = json.loads(Path(path).read_text())
    atoms = Atoms(numbers=d["numbers"], positions=d["positions"], cell=d["cell"], pbc=d["pbc"], tags=d["tags"])
    if d["fixed"]:
        atoms.set_constraint(FixAtoms(indices=d["fixed"]))
    return atoms, np.asarray(d["velocities"], dtype=np.float64)


def _benchmark():
    """model_throughput.py (this checkout's): its MD structures, start velocities and force scale."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import model_throughput

    return model_throughput


def _structures() -> dict:
    """The MD structures of model_throughput.py (this checkout's code builds them for both ways)."""
    return {label.split("-")[0]: atoms for label, atoms in _benchmark().md_structures().items()}


def _save_start(atoms, path: Path) -> None:
    """``atoms`` with model_throughput.py's start velocities, as JSON."""
    from ase.constraints import FixAtoms

    fixed = sorted(int(i) for c in atoms.constraints if isinstance(c, FixAtoms) for i in c.get_indices())
    path.write_text(json.dumps({
        "numbers": atoms.numbers.tolist(), "positions": atoms.positions.tolist(),
        "cell": atoms.cell.array.tolist(), "pbc": atoms.pbc.tolist(), "tags": atoms.get_tags().tolist(),
        "fixed": fixed, "velocities": _benchmark().md_velocities(atoms).tolist()}))


# --- driver -------------------------------------------------------------------------------------

class Worker:
    """One worker process (one code version), fed one block at a time."""

    def __init__(self, root: Path, way: str, preset: str, start: Path, threads: int, weights: Path):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(root), way, preset,
               str(start), str(threads), str(weights)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.way = way
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.way!r} worker stopped (its error is above)")
        return json.loads(line)

    def block(self, steps: int) -> dict:
        self.proc.stdin.write(json.dumps({"steps": steps}) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _weights(preset: str, atoms, path: Path) -> None:
    """Random weights of ``preset`` (seed 0), normaliser scaled as model_throughput.py's MD, saved to ``path``."""
    import torch

    from kdcache.models.presets import build_preset

    torch.manual_seed(0)
    model = build_preset(preset).eval()
    _benchmark()._scaled_for_md(model, atoms)
    torch.save(model.state_dict(), path)


def _export(rev: str, into: Path) -> str:
    """``git archive`` of ``rev`` unpacked under ``into``; returns the full commit id."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                            capture_output=True, text=True)
    if commit.returncode != 0:
        raise SystemExit(f"--today {rev!r} is not a commit of {REPO}: {commit.stderr.strip()}")
    archive = subprocess.Popen(["git", "-C", str(REPO), "archive", commit.stdout.strip()], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(into)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise SystemExit(f"git archive {rev} failed")
    return commit.stdout.strip()


def compare(preset: str, structure: str, threads: int, args, today_root: Path, tmp: Path) -> dict:
    atoms = _structures()[structure]
    weights, start = tmp / f"{preset}-{structure}.pt", tmp / f"{structure}.json"
    _weights(preset, atoms, weights)
    _save_start(atoms, start)
    workers = {"today": Worker(today_root, "today-fast" if args.today_fast else "today", preset, start, threads, weights),
               args.now: Worker(REPO, args.now, preset, start, threads, weights)}
    try:
        # warm-up (the fast path compiles here), then the positions after it, way against way
        ends = {way: w.block(args.steps) for way, w in workers.items()}
        a, b = (ends[w]["positions"] for w in workers)
        drift = max(abs(x - y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))
        times: dict[str, dict[str, list]] = {way: {"wall": [], "cpu": []} for way in workers}
        for r in range(args.rounds):
            order = list(workers) if r % 2 == 0 else list(workers)[::-1]  # A B, B A, ...
            for way in order:
                out = workers[way].block(args.steps)
                times[way]["wall"].append(out["wall"])
                times[way]["cpu"].append(out["cpu"])
    finally:
        for w in workers.values():
            w.close()
    rate = {way: args.steps / statistics.median(t["wall"]) for way, t in times.items()}
    rate_cpu = {way: args.steps / statistics.median(t["cpu"]) for way, t in times.items()}
    per_round = [t_today / t_now for t_today, t_now in zip(times["today"]["wall"], times[args.now]["wall"])]
    return {
        "preset": preset, "structure": structure, "threads": threads, "now": args.now,
        "steps_per_block": args.steps, "rounds": args.rounds,
        "today_steps_per_s": rate["today"], "now_steps_per_s": rate[args.now],
        "ratio": rate[args.now] / rate["today"], "ratio_cpu": rate_cpu[args.now] / rate_cpu["today"],
        "ratio_per_round": per_round,
        "max_abs_diff_pos_after_warmup_A": drift,
    }


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        root, way, preset, start, threads, weights = sys.argv[2:8]
        return _worker(root, way, preset, start, int(threads), weights)
    sys.path.insert(0, str(REPO))  # the driver (weights, structures) runs this checkout's code
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--today", default=TODAY, help=f"git revision whose calculator is 'today' (default {TODAY})")
    p.add_argument("--today-fast", action="store_true",
                   help="the revision's compiled path (fast=True) instead of its default calculator: "
                        "two versions of the fast path, A/B")
    p.add_argument("--now", choices=("fast", "eager"), default="fast", help="this checkout's way (default fast)")
    p.add_argument("--presets", nargs="+", default=["schnet"])
    p.add_argument("--structures", nargs="+", choices=("slab", "molecule"), default=["molecule"])
    p.add_argument("--threads", nargs="+", type=int, default=[1])
    p.add_argument("--steps", type=int, default=60, help="MD steps per block (default 60)")
    p.add_argument("--rounds", type=int, default=6, help="timed blocks per way, interleaved (default 6)")
    p.add_argument("--json", action="store_true", help="print one JSON object per comparison")
    args = p.parse_args(argv)
    from kdcache.models.presets import PRESETS

    unknown = [n for n in args.presets if n not in PRESETS]
    if unknown:
        p.error(f"unknown preset(s) {unknown}; known: {sorted(PRESETS)}")
    with tempfile.TemporaryDirectory(prefix="kdcache-today-") as tmp:
        tmp = Path(tmp)
        today_root = tmp / "today"
        today_root.mkdir()
        commit = _export(args.today, today_root)
        print(f"today = {commit[:10]} ({args.today}); now = {args.now}, this checkout", flush=True)
        for preset in args.presets:
            for structure in args.structures:
                for threads in args.threads:
                    res = compare(preset, structure, threads, args, today_root, tmp)
                    res["today_commit"] = commit
                    if args.json:
                        print(json.dumps(res), flush=True)
                    else:
                        print(f"{preset:12s} {structure:9s} {threads} thr  today {res['today_steps_per_s']:7.2f}"
                              f"  {args.now} {res['now_steps_per_s']:7.2f} steps/s  ratio {res['ratio']:.2f}"
                              f" (cpu {res['ratio_cpu']:.2f}; rounds "
                              f"{' '.join(f'{x:.2f}' for x in res['ratio_per_round'])})"
                              f"  pos diff after warm-up {res['max_abs_diff_pos_after_warmup_A']:.1e} Å",
                              flush=True)


if __name__ == "__main__":
    main()
