"""Throughput of the model presets, eager vs fast path: inference, training steps and ASE MD.

Three comparisons, each in one process with the two ways interleaved round by round (A B A B ...,
see ``benchmarks/_timing.py``), the median of each way and the ratio fast / eager:

* **inference** — samples/s of ``model(batch)`` (graph construction, energies and forces included;
  ``torch.no_grad``, gradient-force models enable gradients inside), eager model vs
  ``kdcache.models.fast.fast_model`` of a copy with the same weights;
* **training** — steps/s of forward + energy/force MSE loss + backward + AdamW step, each way
  with its own copy of the same initial weights and its own optimiser (gradient-force models
  differentiate the forces again: ``create_graph``);
* **md** — ASE ``VelocityVerlet`` steps/s (1 fs, 300 K start) on a 67-atom OC20-like slab and a
  20-atom molecule (the s22 pyrazine dimer), "today" = ``KDCacheCalculator(model)`` on the eager
  model with no neighbour-list reuse (``skin=0``) vs ``KDCacheCalculator(model, fast=True)``
  with its default reuse. (This checkout's eager path, faster than the calculator of the day
  issue 12 was filed: ``benchmarks/md_today.py`` runs that one, from git.)

The one-time cost of the fast path (the first call, which compiles) is reported apart from the
timed rounds, and the outputs of the two ways are compared (max abs difference of energies and
forces; for training, of the first loss and its gradients, taken from identical weights).

The structures are built deterministically: fcc(111) slabs of Cu, Pt, Ag or Pd (3x3 or 4x4, four
or five layers, 10-15 Å vacuum, rattled) with a small adsorbate (O, OH, CO, CH3, H2O), tags 0/1/2
and FixAtoms on the subsurface, as OC20 S2EF samples (46-84 atoms, mean ~66; OC20's is ~73).
Weights are random (speed does not depend on them); for MD the normaliser is scaled so that the
RMS force on the free atoms of the start structure is 0.5 eV/Å, a realistic size.

    python benchmarks/model_throughput.py --quick                  # tiny presets: ~20 s warm, a few minutes cold
    python benchmarks/model_throughput.py --threads 1 2            # OC20 presets (long: compiles)
    python benchmarks/model_throughput.py --presets painn-tiny schnet-tiny --sections inference
    python benchmarks/model_throughput.py --device cuda --json

Several ``--threads`` run one child process each (compiled CPU kernels fix their thread count
when they are generated). Figures are recorded in docs/benchmarks-models.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import interleaved, timed  # noqa: E402

from kdcache import keys as K  # noqa: E402
from kdcache.calculator import KDCacheCalculator, atoms_to_batch  # noqa: E402
from kdcache.models.base import Normalizer  # noqa: E402
from kdcache.models.fast import fast_model  # noqa: E402
from kdcache.models.presets import PRESETS, build_preset, count_parameters  # noqa: E402

ADSORBATES = ["O", "OH", "CO", "CH3", "H2O"]
SECTIONS = ("inference", "training", "md")
#: the issue's OC20 presets; training leaves out the teacher (GemNet-OC is never trained here)
FULL = dict(presets=["painn-small", "painn-big", "schnet", "gemnet-oc"], md_presets=["painn-small", "schnet"],
            structures=8, batch_size=4, repeats=5, md_steps=300, md_blocks=5, threads=[1])
QUICK = dict(presets=["painn-tiny", "schnet-tiny"], md_presets=["painn-tiny"],
             structures=4, batch_size=2, repeats=3, md_steps=30, md_blocks=3, threads=[1])
MD_TEMPERATURE_K = 300.0
MD_RMS_FORCE = 0.5  # eV/Å on the free atoms of the start structure
SLAB_ATOMS = 67


def is_teacher(name: str) -> bool:
    """GemNet-OC presets: benchmarked at inference only, on fewer structures (they are slow)."""
    return PRESETS[name][0] == "gemnet_oc"


# --- structures ------------------------------------------------------------------------------

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


def md_structures() -> dict:
    """The two MD systems: the OC20-like slab closest to 67 atoms and a 20-atom molecule."""
    from ase.collections import s22

    slabs = oc20_like(8)
    slab = min(slabs, key=lambda a: abs(len(a) - SLAB_ATOMS))
    mol = s22["Pyrazine_dimer"].copy()  # C8H8N4, 20 atoms, no cell (a molecule)
    mol.rattle(stdev=0.02, seed=0)
    return {f"slab-{len(slab)}": slab, f"molecule-{len(mol)}": mol}


def batches(structures, batch_size: int, dtype, device):
    from torch_geometric.data import Batch

    singles = [atoms_to_batch(a, dtype=dtype, device="cpu") for a in structures]
    out = []
    for i in range(0, len(singles), batch_size):
        datas = [b.get_example(0) for b in singles[i : i + batch_size]]
        out.append(Batch.from_data_list(datas).to(device))
    return out


def _sync_for(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def _agreement(eager_outs: list[dict], fast_outs: list[dict]) -> dict:
    """Max abs difference (and max abs value, for scale) of energies and forces over batches."""
    res = {}
    for key in (K.ENERGY, K.FORCES):
        if key in eager_outs[0]:
            res[f"max_abs_diff_{key}"] = max(_max_abs(e[key], f[key]) for e, f in zip(eager_outs, fast_outs))
            res[f"max_abs_{key}"] = max(float(e[key].detach().abs().max()) for e in eager_outs)
    return res


def _workload(name: str, args, dtype, device) -> tuple[list, int]:
    """The batches a preset runs on, and the number of samples in them."""
    n, bs = (args.gemnet_structures, args.gemnet_batch_size) if is_teacher(name) else (args.structures, args.batch_size)
    return batches(oc20_like(n), bs, dtype, device), n


def _model(name: str, device, dtype) -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights in every process
    return build_preset(name).to(device=device, dtype=dtype)


def comparison(t: dict, units: float, eager: str = "eager") -> dict:
    """The figures of one interleaved comparison: median rates of the two ways and their ratios.

    ``ratio`` (median wall time) is the headline; ``ratio_cpu`` uses this process's CPU time and
    ``ratio_best`` the fastest round of each way, both less sensitive to other jobs' load on a
    shared machine (load only ever adds time).

    Args:
        t: way name -> :class:`_timing.Timings` (``eager`` and ``"fast"``).
        units: samples or steps done in one round.
        eager: the name of the reference way.
    """
    ref, fast = t[eager], t["fast"]
    return {
        "eager_per_s": ref.rate(units), "fast_per_s": fast.rate(units),
        "ratio": fast.rate(units) / ref.rate(units),
        "ratio_cpu": fast.rate(units, "cpu") / ref.rate(units, "cpu"),
        "ratio_best": min(ref.wall) / min(fast.wall),
        "eager_wall_s": ref.wall, "fast_wall_s": fast.wall,
    }


# --- the three comparisons -----------------------------------------------------------------------

def bench_inference(name: str, args, device, dtype) -> dict:
    """Samples/s of the eager and the fast model on the same batches (see the module docstring)."""
    sync = _sync_for(device)
    data, samples = _workload(name, args, dtype, device)
    eager = _model(name, device, dtype).eval()
    fast = fast_model(copy.deepcopy(eager)).eval()

    def run(model):
        return [model(b) for b in data]

    with torch.no_grad():
        first_s, first_cpu, _ = timed(lambda: fast(data[0]), sync)
        # other batch sizes / atom counts: a dynamic-shape compile must not recompile per batch
        rest_s, _, _ = timed(lambda: [fast(b) for b in data[1:]], sync)
        check = _agreement(run(eager), run(fast))  # also the eager warm-up
        rounds = args.gemnet_repeats if is_teacher(name) else args.repeats
        t = interleaved({"eager": lambda: run(eager), "fast": lambda: run(fast)}, rounds, sync)
    return {
        "samples_per_round": samples, "batches": len(data), "rounds": rounds, **comparison(t, samples),
        "first_call_s": first_s, "first_call_cpu_s": first_cpu, "rest_of_first_pass_s": rest_s, **check,
    }


def bench_training(name: str, args, device, dtype) -> dict:
    """Steps/s of forward + energy/force loss + backward + AdamW of the eager and the fast model."""
    sync = _sync_for(device)
    data, _ = _workload(name, args, dtype, device)
    gen = torch.Generator().manual_seed(1)
    targets = [(torch.randn(int(b[K.NATOMS].numel()), generator=gen, dtype=dtype).to(device),
                torch.randn(b[K.POSITIONS].shape, generator=gen, dtype=dtype).to(device)) for b in data]
    eager = _model(name, device, dtype).train()
    fast = fast_model(copy.deepcopy(eager)).train()
    ways = {"eager": (eager, torch.optim.AdamW(eager.parameters(), lr=1e-4)),
            "fast": (fast, torch.optim.AdamW(fast.parameters(), lr=1e-4))}

    def step(way: str, i: int) -> torch.Tensor:
        model, opt = ways[way]
        out = model(data[i])
        energy, forces = targets[i]
        loss = torch.nn.functional.mse_loss(out[K.ENERGY], energy) + torch.nn.functional.mse_loss(out[K.FORCES], forces)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    def run(way: str):
        for i in range(len(data)):
            step(way, i)

    loss_eager = step("eager", 0)
    first_s, first_cpu, loss_fast = timed(lambda: step("fast", 0), sync)
    # the first step started from identical weights: its loss and gradients must agree
    grads = [(p.grad, q.grad) for p, q in zip(eager.parameters(), fast.parameters())
             if p.grad is not None and q.grad is not None and p.shape == q.shape]
    check = {
        "abs_diff_loss": _max_abs(loss_eager, loss_fast), "loss": float(loss_eager),
        "max_abs_diff_grad": max((_max_abs(g, h) for g, h in grads), default=float("nan")),
        "max_abs_grad": max((float(g.abs().max()) for g, _ in grads), default=float("nan")),
        "grads_compared": len(grads),
    }
    rest_s, _, _ = timed(lambda: [step("fast", i) for i in range(1, len(data))], sync)
    run("eager")  # eager warm-up, the same number of steps
    steps = len(data)
    t = interleaved({"eager": lambda: run("eager"), "fast": lambda: run("fast")}, args.repeats, sync)
    return {
        "steps_per_round": steps, "rounds": args.repeats, **comparison(t, steps),
        "first_call_s": first_s, "first_call_cpu_s": first_cpu, "rest_of_first_pass_s": rest_s, **check,
    }


def _scaled_for_md(model, atoms) -> None:
    """Set the normaliser so that the RMS force on the free atoms of ``atoms`` is MD_RMS_FORCE.

    Random weights give forces of arbitrary size; MD with them would blow the structure apart in
    a few steps (and then the neighbour lists of the two ways differ from the timing's point of
    view). One factor for energies and forces keeps gradient forces = -dE/dx.
    """
    model.normalizer = Normalizer()
    batch = atoms_to_batch(atoms, dtype=model.param_dtype, device=next(model.parameters()).device)
    with torch.no_grad():
        forces = model.predict(batch)[K.FORCES].double().cpu()
    free = ~batch[K.FIXED].cpu()
    rms = float(forces[free].pow(2).sum(-1).mean().sqrt())
    scale = MD_RMS_FORCE / rms if rms > 0 else 1.0
    model.normalizer = Normalizer(0.0, scale, scale).to(next(model.parameters()).device)


def md_velocities(atoms) -> np.ndarray:
    """Maxwell-Boltzmann velocities of ``atoms`` at MD_TEMPERATURE_K (seed 0; FixAtoms zeroes the
    held ones), by hand: ASE renamed its helper across the versions we accept."""
    from ase import units

    start = atoms.copy()
    masses = start.get_masses()[:, None]
    start.set_momenta(np.random.default_rng(0).standard_normal((len(start), 3))
                      * np.sqrt(masses * units.kB * MD_TEMPERATURE_K))
    return start.get_velocities()


def bench_md(name: str, label: str, atoms0, args, device, dtype) -> dict:
    """VelocityVerlet steps/s through the ASE calculator: today's (eager, no reuse) vs fast."""
    from ase import units
    from ase.md.verlet import VelocityVerlet

    model = _model(name, device, dtype).eval()
    _scaled_for_md(model, atoms0)
    fast_kwargs = {} if args.skin is None else {"skin": args.skin}
    calcs = {"today": KDCacheCalculator(copy.deepcopy(model), device=device, fast=False, skin=0.0),
             "fast": KDCacheCalculator(copy.deepcopy(model), device=device, fast=True, **fast_kwargs)}
    velocities = md_velocities(atoms0)

    def block(way: str, steps: int):
        atoms = atoms0.copy()
        atoms.set_velocities(velocities)
        atoms.calc = calcs[way]
        VelocityVerlet(atoms, timestep=1.0 * units.fs).run(steps)
        return atoms

    def single(way: str) -> dict:
        atoms = atoms0.copy()
        atoms.calc = calcs[way]
        return {K.ENERGY: torch.tensor([atoms.get_potential_energy()]), K.FORCES: torch.tensor(atoms.get_forces())}

    first_s, first_cpu, fast_out = timed(lambda: single("fast"))
    check = _agreement([single("today")], [fast_out])
    # warm-up blocks, which also check that reuse leaves the trajectory as it was
    warm = max(1, args.md_steps // args.md_blocks)
    ends = {way: block(way, warm) for way in calcs}
    check["max_abs_diff_pos_after_warmup"] = float(np.abs(ends["today"].positions - ends["fast"].positions).max())
    check["warmup_steps"] = warm
    per_block = max(1, args.md_steps // args.md_blocks)
    t = interleaved({way: (lambda w=way: block(w, per_block)) for way in calcs}, args.md_blocks, _sync_for(device))
    return {
        "structure": label, "atoms": len(atoms0), "steps_per_round": per_block, "rounds": args.md_blocks,
        **comparison(t, per_block, eager="today"), "first_call_s": first_s, "first_call_cpu_s": first_cpu, **check,
    }


# --- running and reporting ------------------------------------------------------------------------

def _jobs(args) -> list[tuple]:
    """(section, preset, md label or None) in the order they run."""
    jobs = []
    if "inference" in args.sections:
        jobs += [("inference", p, None) for p in args.presets]
    if "training" in args.sections:
        jobs += [("training", p, None) for p in args.train_presets]
    if "md" in args.sections:
        jobs += [("md", p, label) for p in args.md_presets for label in md_structures()]
    return jobs


def run_all(args, device: torch.device, dtype, emit) -> None:
    """Every job at this process's thread count; ``emit(result)`` after each."""
    systems = md_structures() if "md" in args.sections else {}
    for section, preset, label in _jobs(args):
        res = {"section": section, "preset": preset, "model": PRESETS[preset][0],
               "params_M": round(count_parameters(preset) / 1e6, 2), "threads": torch.get_num_threads(),
               "device": str(device), "dtype": str(dtype).replace("torch.", "")}
        try:
            if section == "inference":
                res.update(bench_inference(preset, args, device, dtype))
            elif section == "training":
                res.update(bench_training(preset, args, device, dtype))
            else:
                res.update(bench_md(preset, label, systems[label], args, device, dtype))
        except Exception as exc:  # one failing way must not lose the figures of the others
            res["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        emit(res)


def _fmt(x, spec: str) -> str:
    return "—" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def table(results: list[dict]) -> str:
    """Markdown tables of the results, one per section."""
    lines = []
    heads = {
        "inference": ("inference, samples/s", "max abs ΔE / ΔF (max abs E / F)"),
        "training": ("training, steps/s", "first step: abs Δloss (loss); max abs Δgrad (max abs grad)"),
        "md": ("MD through the ASE calculator, steps/s (eager = today's: eager, skin 0)",
               "start: max abs ΔE / ΔF; max abs Δpos after the warm-up block"),
    }
    for section in SECTIONS:
        rows = [r for r in results if r["section"] == section]
        if not rows:
            continue
        title, agree = heads[section]
        lines += ["", f"{title}", "",
                  f"| preset | {'structure | ' if section == 'md' else ''}threads | eager | fast | fast/eager "
                  f"| fast/eager (CPU time) | fast/eager (best rounds) | first fast call s (rest of first pass) "
                  f"| {agree} |",
                  "|---|" + ("---|" if section == "md" else "") + "---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            where = f"{r['structure']} | " if section == "md" else ""
            if "error" in r:
                lines.append(f"| {r['preset']} | {where}{r['threads']} | failed: {r['error'][:120]} |||||||")
                continue
            if section == "inference":
                agree_txt = (f"{_fmt(r.get('max_abs_diff_energy'), '.2e')} / {_fmt(r.get('max_abs_diff_forces'), '.2e')} "
                             f"({_fmt(r.get('max_abs_energy'), '.3g')} / {_fmt(r.get('max_abs_forces'), '.3g')})")
            elif section == "training":
                agree_txt = (f"{_fmt(r['abs_diff_loss'], '.2e')} ({_fmt(r['loss'], '.3g')}); "
                             f"{_fmt(r['max_abs_diff_grad'], '.2e')} ({_fmt(r['max_abs_grad'], '.3g')})")
            else:
                agree_txt = (f"{_fmt(r.get('max_abs_diff_energy'), '.2e')} / {_fmt(r.get('max_abs_diff_forces'), '.2e')}; "
                             f"{_fmt(r['max_abs_diff_pos_after_warmup'], '.2e')} Å")
            rest = f" ({r['rest_of_first_pass_s']:.1f})" if "rest_of_first_pass_s" in r else ""
            lines.append(
                f"| {r['preset']} | {where}{r['threads']} | {r['eager_per_s']:.3g} | {r['fast_per_s']:.3g} "
                f"| **{r['ratio']:.2f}** | {r['ratio_cpu']:.2f} | {r['ratio_best']:.2f} | {r['first_call_s']:.1f}{rest} "
                f"| {agree_txt} |"
            )
    return "\n".join(lines)


def _header(argv: list[str], dtype, device) -> str:
    # kdcache's (inductor_cache_dir): torch's own cache_dir() names torch's default until the
    # first fast model points inductor at kdcache's directory
    from kdcache.models.fast import inductor_cache_dir

    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (f"# command: python benchmarks/model_throughput.py {shlex.join(argv)}\n"
            f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {device}, {str(dtype).replace('torch.', '')}, "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {load}\n"
            f"# inductor cache: {inductor_cache_dir()}")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help=f"tiny presets, few structures and steps (a check that the script works): {QUICK}")
    p.add_argument("--presets", nargs="+", default=None, help=f"inference presets (default {FULL['presets']})")
    p.add_argument("--train-presets", nargs="+", default=None,
                   help="training presets (default: the inference presets without GemNet-OC)")
    p.add_argument("--md-presets", nargs="+", default=None,
                   help=f"MD presets (default {FULL['md_presets']}; with --presets: those without GemNet-OC)")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--threads", nargs="+", type=int, default=None,
                   help="torch CPU thread counts, one child process each (default 1)")
    p.add_argument("--structures", type=int, default=None, help="OC20-like structures per round (default 8)")
    p.add_argument("--batch-size", type=int, default=None, help="default 4")
    p.add_argument("--gemnet-structures", type=int, default=4, help="structures per round for GemNet-OC presets")
    p.add_argument("--gemnet-batch-size", type=int, default=2)
    p.add_argument("--gemnet-repeats", type=int, default=3, help="interleaved rounds for GemNet-OC presets")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (inference, training; default 5)")
    p.add_argument("--md-steps", type=int, default=None, help="timed MD steps per way (default 300)")
    p.add_argument("--md-blocks", type=int, default=None, help="interleaved MD blocks they are split into (default 5)")
    p.add_argument("--skin", type=float, default=None, help="neighbour-list skin of the fast calculator (Å; default: its own)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--inductor-cache", default=None,
                   help="TORCHINDUCTOR_CACHE_DIR for the compiles (a fresh directory shows the cold cost)")
    p.add_argument("--json", action="store_true", help="also print one JSON line per result")
    p.add_argument("--results", default=None, help=argparse.SUPPRESS)  # child -> parent
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    for key in ("structures", "batch_size", "repeats", "md_steps", "md_blocks", "threads"):
        if getattr(args, key) is None:
            setattr(args, key, base[key])
    if args.presets is None:
        args.presets = list(base["presets"])
        args.md_presets = args.md_presets or list(base["md_presets"])
    for names in (args.presets, args.train_presets or [], args.md_presets or []):
        unknown = [n for n in names if n not in PRESETS]
        if unknown:
            p.error(f"unknown preset(s) {unknown}; known: {sorted(PRESETS)}")
    students = [n for n in args.presets if not is_teacher(n)]
    args.train_presets = args.train_presets or students
    args.md_presets = args.md_presets or students
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.inductor_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(args.inductor_cache).resolve())
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)

    if len(args.threads) > 1:
        # one child per thread count: generated CPU kernels keep the thread count of their compile
        print(f"# command: python benchmarks/model_throughput.py {shlex.join(argv)}", flush=True)
        results: list[dict] = []
        with tempfile.TemporaryDirectory() as tmp:
            for n in args.threads:
                out = Path(tmp) / f"threads-{n}.jsonl"
                child = [a for a in _without_threads(argv)] + ["--threads", str(n), "--results", str(out)]
                rc = subprocess.call([sys.executable, __file__, *child])
                if out.exists():
                    results += [json.loads(line) for line in out.read_text().splitlines() if line]
                if rc:
                    print(f"# child with {n} threads exited with {rc}", flush=True)
        print(table(results))
        return 0 if results and not any("error" in r for r in results) else 1

    torch.set_num_threads(args.threads[0])
    print(_header(argv, dtype, device), flush=True)
    results = []

    def emit(res: dict) -> None:
        results.append(res)
        what = f"{res['section']:<9} {res['preset']:<14} {res.get('structure', ''):<12} {res['threads']} threads"
        if "error" in res:
            print(f"{what}  FAILED {res['error']}", flush=True)
        else:
            print(f"{what}  eager {res['eager_per_s']:9.3f}/s  fast {res['fast_per_s']:9.3f}/s  "
                  f"ratio {res['ratio']:.2f} (CPU {res['ratio_cpu']:.2f})  first fast call {res['first_call_s']:.1f} s",
                  flush=True)
        if args.json:
            print(json.dumps(res), flush=True)
        if args.results:
            with open(args.results, "a") as fh:
                fh.write(json.dumps(res) + "\n")

    run_all(args, device, dtype, emit)
    if not args.results:  # a child's table is printed by the parent, with the others'
        print(table(results))
    return 0 if results and not any("error" in r for r in results) else 1


def _without_threads(argv: list[str]) -> list[str]:
    """``argv`` without ``--threads`` and its values (the parent hands each child its own)."""
    out, skip = [], False
    for a in argv:
        if a == "--threads" or a.startswith("--threads="):
            skip = a == "--threads"
            continue
        if skip and not a.startswith("-"):
            continue
        skip = False
        out.append(a)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
