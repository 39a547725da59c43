"""``kdcache pipeline run``: data -> teacher -> store -> students -> evaluation -> report.

Layout of a run folder (default ``runs/<recipe name>``)::

    recipe.yaml              the recipe as run (for the record)
    data/                    demo data (only for ``data: {demo: ...}``; ``pool.lmdb``, unlabelled,
                             with ``num_pool``)
    sampled/candidates.lmdb  candidates of the training split or of the unlabelled pool (only for
                             ``data: {sample: ...}``)
    teacher/                 teacher training run (only when the recipe trains it)
    store/teacher.zarr       the teacher's feature store, extracted once (its identity is in the
                             students' stage hashes; a replaced store is extracted again)
    store-sampled/teacher.zarr   the teacher's store of the candidates (their only labels)
    students/<run>/          baseline and one run per strategy (kdcache train run folders)
    eval/<run>/              metrics.json, predictions.npz, features.npz (test split)
    report/                  report.md, report.csv, *.png

Each folder holds a ``stage.json`` (see :mod:`kdcache.pipeline.stages`); stages that are up to
date are skipped, interrupted ones resume, changed ones re-run along with what depends on them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from kdcache import keys as K
from kdcache.errors import ConfigError
from kdcache.fs import ensure_output_folder
from kdcache.pipeline import backends as B
from kdcache.pipeline import report as R
from kdcache.pipeline.recipe import Recipe, StrategySpec, load_recipe
from kdcache.fs import file_sha256
from kdcache.pipeline.stages import StageResult, path_fingerprint, read_stage, run_stage
from kdcache.store.format import recorded_identity
from kdcache.train.strategies import feature_name, needed_features, teacher_features, teacher_kind

#: what a calculator teacher can store (no hidden features; per-atom energies where it gives them)
CALCULATOR_FEATURES = (K.ATOM_ENERGY, feature_name(K.ENERGY))

#: training settings that do not change a run's result (left out of its stage hash)
_NOT_RESULT = ("progress", "num_workers", "checkpoint_every", "val_batch_size")
#: the store stage's output, in its folder
STORE = "teacher.zarr"
#: a calculator teacher with test errors below this (meV, meV/Å) is the method that labelled the
#: test data (float32 positions leave ~1e-3): the report says its row is the reference itself
REPRODUCES_LABELS = 0.1
#: the sampling stage's output, in its folder
CANDIDATES = "candidates.lmdb"
#: each data source's store folder in the run folder
STORE_FOLDERS = {"train": "store", "sampled": "store-sampled"}
#: what ``data.sample.seeds`` names, in words
SAMPLE_SOURCES = {"train": "training structures", "pool": "unlabelled pool structures"}
SAMPLE_STAGES = {"train": "training split", "pool": "unlabelled pool"}


def _short_id(identity: str | None) -> str:
    return identity[:12] if identity else "none (not a finished kdcache store of format 2)"


@dataclass
class PipelineResult:
    out: Path
    rows: list
    stages: list[StageResult] = field(default_factory=list)
    report_md: Path | None = None
    report_csv: Path | None = None

    @property
    def ran(self) -> list[str]:
        return [s.name for s in self.stages if not s.skipped]


def _result_settings(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in _NOT_RESULT}


def resolve_store_features(recipe: Recipe, teacher_arch: str | None) -> tuple[str, ...] | None:
    """The store's ``--features``: as given, or (``auto``) every target the teacher can give.

    ``auto`` stores all of them, not only what today's strategies read: the store is then the
    same whichever strategies the recipe lists, so adding a strategy later trains one student
    instead of re-extracting the store and re-training every distilled student.

    Args:
        recipe: the loaded recipe.
        teacher_arch: what names the teacher (its model or preset name; None: unknown), resolved
            to its kind by :func:`kdcache.train.strategies.teacher_kind`; what it offers and what
            each strategy reads come from the strategy table and the model class.

    Returns:
        The features; None for ``auto`` with a calculator teacher (it stores what it offers:
        energies and forces, and per-atom energies where it gives them).

    Raises:
        ConfigError: the teacher cannot give a listed feature, or the store would lack one a
            run reads (key ``store.features``).
    """
    calculator = recipe.teacher.calculator is not None
    kind = None if calculator else teacher_kind(teacher_arch)
    # a calculator has no hidden features (kdcache.teachers.calculator)
    offered = CALCULATOR_FEATURES if calculator else teacher_features(kind)  # None: a teacher of unknown kind
    reads = {(s.name, strat): needed_features(strat, kind) for s in recipe.strategies for strat in s.terms}
    runs = [None] + [c for s in recipe.strategies for c in s.candidates()]
    reads.update({("baseline" if spec is None else spec.name, "labels: teacher"): (feature_name(K.ENERGY),)
                  for spec in runs if recipe.labels(spec) != "reference"})
    needed = [f for feats in reads.values() for f in feats]
    feats = recipe.store.features or tuple(dict.fromkeys([*(offered or ()), *needed]))
    if offered is not None:
        what = f"calculator teacher ({recipe.teacher.calculator})" if calculator else f"{kind} teacher"
        for (run, strat), wanted in reads.items() if not recipe.store.features else ():
            lacking = [f for f in wanted if f not in offered]
            if lacking:  # (auto: name the run that asks for what the teacher lacks)
                raise ConfigError(f"recipe {recipe.path}: key 'store.features': {strat!r} (run {run!r}) reads "
                                  f"{lacking}, which a {what} does not give")
        missing = [f for f in feats if f not in offered]
        if missing:
            raise ConfigError(f"recipe {recipe.path}: key 'store.features': a {what} has no {missing}")
    for (run, strat), wanted in reads.items():
        lacking = [f for f in wanted if f not in feats]
        if lacking:
            raise ConfigError(
                f"recipe {recipe.path}: key 'store.features': {strat!r} (run {run!r}) reads {lacking}, "
                f"which the store would not hold ({list(feats)})")
    return None if calculator and not recipe.store.features else tuple(feats)


def run_folder(recipe: Recipe, out: str | Path | None = None) -> Path:
    """A pipeline's run folder: ``out`` (``pipeline run --out``), else the recipe's ``out``.

    Args:
        recipe: the loaded recipe.
        out: the command line's ``--out``, or None.

    Raises:
        ConfigError: an existing file is there, naming ``--out`` or the recipe key ``out``
            (refused before any stage, instead of a bare "File exists" from the first mkdir).
    """
    if out is not None:
        return ensure_output_folder(out, "--out")
    return ensure_output_folder(recipe.out, f"recipe {recipe.path}: key 'out':")


class Pipeline:
    """Runs one recipe. ``log`` receives every progress line (default: print)."""

    def __init__(self, recipe: Recipe, out: str | Path | None = None, device: str | None = None,
                 log: Callable[[str], None] | None = None, jobs: int = 1):
        self.recipe = recipe
        self.jobs = max(1, int(jobs))
        self.out = run_folder(recipe, out)
        self.device = B.resolve_device(device or recipe.device)
        self.log = log or (lambda msg: print(msg, flush=True))
        self.stages: list[StageResult] = []

    def _stage(self, name, folder, inputs, fn, resumable: bool = True, still_valid=None) -> StageResult:
        res = run_stage(name, folder, inputs, fn, log=self.log, resumable=resumable, still_valid=still_valid)
        self.stages.append(res)
        return res

    # --- steps ------------------------------------------------------------------------------
    def data(self) -> tuple[dict, dict]:
        """Dataset paths and their identities (what downstream hashes depend on): the three
        splits, and ``sampled`` (the candidates) when the recipe samples."""
        d = self.recipe.data
        if d.demo is not None:
            folder = self.out / "data"
            demo = dict(d.demo)
            # (a recipe without a pool keeps the stage inputs, so earlier demo data stay valid)
            inputs = {"demo": demo if demo["num_pool"] else {k: v for k, v in demo.items() if k != "num_pool"}}
            res = self._stage("data (demo)", folder, inputs,
                              lambda f: B.make_demo_data(f, demo["num_train"], demo["num_val"], demo["num_test"],
                                                         demo["seed"], demo["num_pool"]), resumable=False)
            paths = {k: str(folder / res.outputs[k]) for k in res.outputs}
            ids = {k: {"demo": res.input_hash, "split": k} for k in paths}
        else:
            paths = {"train": d.train, "val": d.val, "test": d.test, **({"pool": d.pool} if d.pool else {})}
            for k, p in paths.items():
                if not Path(p).exists():
                    raise ConfigError(f"recipe {self.recipe.path}: key 'data.{k}': {p} does not exist")
            ids = {k: path_fingerprint(p) for k, p in paths.items()}
        if d.sample is not None:
            source = d.sample["seeds"]
            paths["sampled"], ids["sampled"] = self.sample(paths[source], ids[source], d.sample, source)
        return paths, ids

    def sample(self, seed_path: str, seed_id, sample: dict, source: str = "train") -> tuple[str, dict]:
        """Candidates of the training split or the pool (``kdcache data sample``), written once;
        their path and identity."""
        settings = {k: v for k, v in sample.items() if k != "seeds"}
        what = SAMPLE_SOURCES[source]

        def fn(folder: Path) -> dict:
            counts = B.sample_candidates(seed_path, folder / CANDIDATES, settings)
            self.log(f"  {counts['candidates']} candidates from {counts['seed_structures']} {what} "
                     f"({counts['rejected_draws']} draws rejected by the minimum distance)")
            return {"candidates": CANDIDATES, "counts": counts}

        # the file appears only when complete: an interrupted sampling starts over; sampling the
        # training split keeps the stage inputs it had before pools existed
        inputs = {"seed_data": seed_id, "settings": settings, **({"seeds": source} if source != "train" else {})}
        res = self._stage(f"data (sample candidates of the {SAMPLE_STAGES[source]})", self.out / "sampled",
                          inputs, fn, resumable=False)
        return str(res.folder / CANDIDATES), {"sampled": res.input_hash}

    def teacher(self, paths: dict, ids: dict) -> tuple[Path, dict, str | None]:
        """Teacher checkpoint, its identity and its architecture (registry name); a calculator
        teacher has neither checkpoint nor architecture (None, identity, None)."""
        t = self.recipe.teacher
        if t.calculator is not None:
            self.log(f"teacher: {t.describe()}")
            return None, B.calculator_identity(t.calculator_spec), None
        if t.checkpoint is not None:
            ckpt = Path(t.checkpoint)
            if not ckpt.is_file():
                raise ConfigError(f"recipe {self.recipe.path}: key 'teacher.checkpoint': {ckpt} does not exist")
            self.log(f"teacher: checkpoint {ckpt}")
            ident = {"checkpoint_sha256": self._cached_sha(ckpt), "preset": t.preset}
            arch = B.checkpoint_model_name(ckpt)
            if arch is None and t.preset:
                arch = B.count_preset(t.preset, **t.overrides)["name"]
            return ckpt, ident, arch
        settings = {"seed": self.recipe.seed, **t.train, "student": t.preset, "student_overrides": t.overrides,
                    "data": paths["train"], "val": paths["val"], "strategy": "none"}
        inputs = {"preset": t.preset, "overrides": t.overrides, "train": _result_settings(t.train), "seed": self.recipe.seed,
                  "data": {"train": ids["train"], "val": ids["val"]}}
        res = self._stage("teacher (train)", self.out / "teacher", inputs,
                          lambda f: B.train(settings, f, self.device))
        ckpt = self.out / "teacher" / res.outputs["checkpoint"]
        return ckpt, {"stage": res.input_hash}, B.checkpoint_model_name(ckpt)

    def _cached_sha(self, path: Path) -> str:
        # hashing a multi-GB checkpoint on every run would defeat "a second run finishes at once"
        cache = self.out / ".checkpoint-sha256.json"
        st = path.stat()
        key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        known = json.loads(cache.read_text()) if cache.is_file() else {}
        if key not in known:
            known[key] = file_sha256(path)
            self.out.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(known, indent=1))
        return known[key]

    def stores(self, ckpt: Path | None, teacher_id: dict, arch: str | None, paths: dict,
               ids: dict) -> dict[str, tuple[Path, str]]:
        """The teacher's store of each data source a run reads (:meth:`Recipe.store_sources`):
        source -> (store path, what the students' hashes name it by)."""
        return {source: self.store(ckpt, teacher_id, arch, paths, ids, source)
                for source in self.recipe.store_sources()}

    def store(self, ckpt: Path | None, teacher_id: dict, arch: str | None, paths: dict, ids: dict,
              source: str = "train") -> tuple[Path, str]:
        """Extract the teacher's store of ``source`` (``train``: the training split, ``sampled``:
        the candidates); returns its path and what the students' hashes name it by: its identity
        (a digest of its contents), or the stage hash for a format 1 store."""
        feats = resolve_store_features(self.recipe, arch)
        st = self.recipe.store
        t = self.recipe.teacher
        # extraction batch size is part of a store's identity (stage one resumes only with the same)
        inputs = {"teacher": teacher_id, "data": ids[source], "features": sorted(feats) if feats else "auto",
                  "dtype": st.dtype, "batch_size": st.batch_size, "options": st.options}
        teacher = t.calculator_spec if t.calculator is not None else t.preset

        def extract(folder: Path) -> dict:
            B.extract(ckpt, teacher, paths[source], folder / STORE, feats, st.dtype, st.batch_size, self.device,
                      st.options)
            # (a JSON object, not a string: string outputs name files)
            return {"store": STORE, "identity": {STORE: recorded_identity(folder / STORE)}}

        def same_store(folder: Path, outputs: dict) -> str | None:
            # cheap (the identity the store records): the contents themselves are checked as they
            # are read, and by `kdcache store verify`
            now, made = recorded_identity(folder / STORE), (outputs.get("identity") or {}).get(STORE)
            if now == made:
                return None
            return f"{STORE} was replaced (its identity is {_short_id(now)}, the one extracted here {_short_id(made)})"

        name = "store (extract teacher features)" if source == "train" else f"store of the {source} data (teacher labels)"
        folder = self.out / STORE_FOLDERS[source]
        res = self._stage(name, folder, inputs, extract, still_valid=same_store)
        return folder / STORE, (res.outputs.get("identity") or {}).get(STORE) or res.input_hash

    def student_job(self, spec: StrategySpec | None, seed: int, paths: dict, ids: dict,
                    stores: dict[str, tuple[Path, str]]) -> "StudentJob":
        """What one student run needs: its stage's name, folder, inputs and training settings.

        Args:
            stores: :meth:`stores`' result (the store of each data source)."""
        r = self.recipe
        name = "baseline" if spec is None else spec.name
        source = "train" if spec is None else spec.data
        train = r.student_train(spec, seed)
        settings = {**train, "student": r.student.preset, "student_overrides": r.student.overrides,
                    "data": paths[source], "val": paths["val"]}
        inputs = {"preset": r.student.preset, "overrides": r.student.overrides, "train": _result_settings(train),
                  "data": {"train": ids[source], "val": ids["val"]}}
        store, store_id = stores.get(source, (None, None))
        if spec is None or not spec.terms:
            settings["strategy"] = "none"
            inputs["strategy"] = "none"
            if r.needs_store(spec):  # the teacher's labels
                settings["store"] = str(store)
                inputs["store"] = store_id
        else:
            settings.update(strategy=spec.strategy_string, feature_loss=spec.loss, store=str(store))
            # the store's identity: a student trained on other targets is out of date
            inputs.update(strategy=spec.terms, loss=spec.loss, store=store_id)
        label = "student baseline (no distillation)" if spec is None else f"student {name} ({spec.label()})"
        run = self.run_id(name, seed)
        if len(r.seeds) > 1:
            label += f", seed {seed}"
        return StudentJob(run, label, self.out / "students" / run, inputs, settings, self.device)

    def run_id(self, name: str, seed: int) -> str:
        """Folder name of one run: ``<name>``, or ``<name>_seed<k>`` when the recipe has several seeds."""
        return f"{name}_seed{seed}" if len(self.recipe.seeds) > 1 else name

    def train_students(self, jobs: list["StudentJob"]) -> dict[str, StageResult]:
        """Run the student stages, ``self.jobs`` at a time (processes), in the given order."""
        if self.jobs <= 1 or len(jobs) <= 1:
            results = {}
            for i, job in enumerate(jobs):
                self.log(f"[{i + 1}/{len(jobs)}] {job.label}")
                results[job.run] = self._stage(job.label, job.folder, job.inputs,
                                               lambda f, job=job: B.train(job.settings, f, job.device))
            return results
        import concurrent.futures as cf
        import multiprocessing as mp

        from kdcache.runtime import default_cpu_threads

        # each process gets its share of the cores: more threads than cores make small CPU
        # matmuls an order of magnitude slower (see kdcache.runtime)
        threads = max(1, default_cpu_threads() * 2 // self.jobs) if self.device == "cpu" else 1
        self.log(f"students: {len(jobs)} runs, {self.jobs} at a time ({threads} CPU thread(s) each)")
        with cf.ProcessPoolExecutor(self.jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {job.run: pool.submit(_student_stage, job, threads) for job in jobs}
            results = {}
            for job in jobs:
                try:
                    res, lines = futures[job.run].result()
                except BaseException:
                    for f in futures.values():
                        f.cancel()
                    raise
                for line in lines:
                    self.log(line)
                self.stages.append(res)
                results[job.run] = res
        return results

    def choose_lambdas(self, runs: dict[str, StageResult], paths: dict, ids: dict) -> dict[str, StrategySpec]:
        """The λ of each strategy's sweep, chosen on the **validation** split (never the test split).

        Score of a candidate: the mean over seeds of (energy MAE / same-seed baseline energy MAE +
        force MAE / same-seed baseline force MAE) on the validation split; the lowest wins."""
        r = self.recipe
        chosen = {s.name: s for s in r.strategies if not s.sweep}
        sweeps = [s for s in r.strategies if s.sweep]
        if not sweeps:
            return chosen
        bench = {}
        for seed in r.seeds:
            run = self.run_id("baseline", seed)
            bench[seed] = self.evaluate(run, runs[run], paths["val"], ids["val"], split="val")
        for spec in sweeps:
            scores = {}
            for cand in spec.candidates():
                ratios = []
                for seed in r.seeds:
                    run = self.run_id(cand.name, seed)
                    m = self.evaluate(run, runs[run], paths["val"], ids["val"], split="val")
                    b = bench[seed]
                    ratios.append(m["energy_mae"] / b["energy_mae"] + m["force_mae"] / b["force_mae"])
                scores[cand.name] = (sum(ratios) / len(ratios), cand)
            best = min(scores, key=lambda k: scores[k][0])
            chosen[spec.name] = scores[best][1]
            self.log(f"lambda of {spec.name} (validation split, mean over seeds of E/E_baseline + F/F_baseline): "
                     + ", ".join(f"{c.label()} {v:.4f}" for v, c in scores.values()) + f" -> {scores[best][1].label()}")
        return chosen

    def _eval_path(self) -> dict:
        """The recipe's ``eval.fast`` as a stage input when it is pinned (auto leaves the inputs,
        and so the stages of existing runs, as they were)."""
        fast = self.recipe.eval["fast"]
        return {} if fast == "auto" else {"fast": fast}

    def evaluate(self, name: str, run: StageResult, data_path: str, data_id, split: str = "val") -> dict:
        """Metrics of a student run on a split (a stage: computed once)."""
        ckpt = run.folder / run.outputs["checkpoint"]
        inputs = {"model": run.input_hash, "data": data_id, "batch_size": self.recipe.eval["batch_size"],
                  **self._eval_path()}

        def fn(folder: Path) -> dict:
            metrics = B.evaluate(ckpt, data_path, self.recipe.eval["batch_size"], self.device,
                                 self.recipe.eval["fast"])
            (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
            return {"metrics": "metrics.json"}

        res = self._stage(f"eval {name} ({split} split)", self.out / f"eval-{split}" / name, inputs, fn,
                          resumable=False)
        return json.loads((res.folder / "metrics.json").read_text())

    def evaluate_test(self, name: str, ckpt: Path, model_id, test_path: str, test_id, is_teacher: bool) -> StageResult:
        r = self.recipe
        n_feat = max(r.report["cka_samples"], r.report["parity_samples"])
        feats = ("node", "e2n") if is_teacher else ("node",)
        inputs = {"model": model_id, "test": test_id, "batch_size": r.eval["batch_size"],
                  "samples": n_feat, "features": list(feats), **self._eval_path()}

        def fn(folder: Path) -> dict:
            preds, hidden = B.collect(ckpt, test_path, n_feat, r.eval["batch_size"], self.device, feats)
            np.savez(folder / "predictions.npz", **preds)
            np.savez(folder / "features.npz", **hidden)
            metrics = B.evaluate(ckpt, test_path, r.eval["batch_size"], self.device, r.eval["fast"])
            metrics.pop("samples_per_s", None)  # measured once per architecture (see throughput)
            (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
            self.log("  " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float))))
            return {"metrics": "metrics.json", "predictions": "predictions.npz", "features": "features.npz"}

        return self._stage(f"eval {name} (test split)", self.out / "eval" / name, inputs, fn, resumable=False)

    def evaluate_calculator_test(self, teacher_id: dict, test_path: str, test_id) -> StageResult:
        """The calculator teacher on the test split, measured as a model is (its predictions
        against the test labels); no hidden features (the CKA plot has no teacher columns)."""
        r = self.recipe
        n_feat = max(r.report["cka_samples"], r.report["parity_samples"])
        inputs = {"teacher": teacher_id, "test": test_id, "batch_size": r.eval["batch_size"], "samples": n_feat}

        def fn(folder: Path) -> dict:
            metrics, preds = B.evaluate_calculator(r.teacher.calculator_spec, test_path, n_feat, r.eval["batch_size"])
            np.savez(folder / "predictions.npz", **preds)
            np.savez(folder / "features.npz")
            # structures/s of the calculator alone, not measured with the students' throughput
            metrics.pop("samples_per_s", None)
            (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
            self.log("  " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float))))
            return {"metrics": "metrics.json", "predictions": "predictions.npz", "features": "features.npz"}

        return self._stage("eval teacher (test split)", self.out / "eval" / "teacher", inputs, fn, resumable=False)

    def throughput(self, models: dict[str, tuple[Path, object]], test_path: str, test_id) -> dict[str, float]:
        """Inference samples/s of each architecture, measured once: interleaved repeats, median.

        Args:
            models: architecture label -> (checkpoint, its identity)."""
        inputs = {"models": {k: v[1] for k, v in models.items()}, "test": test_id,
                  "batch_size": self.recipe.eval["batch_size"], "device": self.device}

        def fn(folder: Path) -> dict:
            figures = B.throughput({k: v[0] for k, v in models.items()}, test_path, self.recipe.eval["batch_size"],
                                   self.device)
            (folder / "throughput.json").write_text(json.dumps(figures, indent=2))
            self.log("  " + ", ".join(f"{k} {v:.1f} samples/s" for k, v in figures.items()))
            return {"throughput": "throughput.json"}

        res = self._stage("throughput (inference, interleaved repeats)", self.out / "eval" / "throughput", inputs, fn,
                          resumable=False)
        return json.loads((res.folder / "throughput.json").read_text())

    # --- whole run ------------------------------------------------------------------------------
    def run(self) -> PipelineResult:
        r = self.recipe
        t0 = time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "recipe.yaml").write_text(yaml.safe_dump(r.raw, sort_keys=False))
        specs = [None] + [c for s in r.strategies for c in s.candidates()]
        self.log(f"pipeline {r.name}: {r.path} -> {self.out} (device {self.device}; "
                 f"teacher {r.teacher.describe()}, {len(specs) * len(r.seeds)} student runs of "
                 f"{r.student.preset}: {len(specs)} settings x {len(r.seeds)} seed(s))")

        paths, ids = self.data()
        ckpt, teacher_id, arch = self.teacher(paths, ids)
        stores = self.stores(ckpt, teacher_id, arch, paths, ids)

        # every run reads its data's one store; none loads the teacher
        jobs = [self.student_job(spec, seed, paths, ids, stores) for spec in specs for seed in r.seeds]
        runs = self.train_students(jobs)
        chosen = self.choose_lambdas(runs, paths, ids)

        if ckpt is None:
            evals = {"teacher": self.evaluate_calculator_test(teacher_id, paths["test"], ids["test"])}
        else:
            evals = {"teacher": self.evaluate_test("teacher", ckpt, teacher_id, paths["test"], ids["test"], True)}
        for name in ["baseline"] + [chosen[s.name].name for s in r.strategies]:
            for seed in r.seeds:
                run = self.run_id(name, seed)
                res = runs[run]
                evals[run] = self.evaluate_test(run, res.folder / res.outputs["checkpoint"], res.input_hash,
                                                paths["test"], ids["test"], False)
        base = runs[self.run_id("baseline", r.seeds[0])]
        timed = {"student": (base.folder / base.outputs["checkpoint"], base.input_hash)}
        if ckpt is not None:  # (a calculator is not a model to time on batches)
            timed = {"teacher": (ckpt, teacher_id), **timed}
        speed = self.throughput(timed, paths["test"], ids["test"])

        rows = self._rows(evals, chosen, arch, speed)
        rep = self._stage("report", self.out / "report",
                          {"evals": {k: v.input_hash for k, v in evals.items()}, "report": r.report,
                           "throughput": speed, "rows": [[row.name, row.kind, row.strategy] for row in rows]},
                          lambda f: self._write_report(f, rows, evals, runs, chosen), resumable=False)
        R.add_gaps(rows)
        self.log("")
        self.log(R.gap_table_text(rows, title=f"{r.name}: share of the student-teacher gap closed (test split)"))
        if r.report.get("compare_to"):
            name = r.report["compare_to"]
            self.log("")
            self.log(R.gap_table_text(R.against(rows, name),
                                      title=f"{r.name}: gap closed against {name} of the same seed (test split)"))
        note = self._teacher_note(rows)
        if note:
            self.log(note)
        self.log(f"\nreport: {rep.folder / 'report.md'}  ({time.time() - t0:.1f}s)")
        return PipelineResult(self.out, rows, self.stages, rep.folder / "report.md", rep.folder / "report.csv")

    def _rows(self, evals: dict, chosen: dict, arch: str | None, speed: dict) -> list[R.Row]:
        r = self.recipe

        def metrics(run: str, who: str) -> dict:
            m = json.loads((evals[run].folder / "metrics.json").read_text())
            m["samples_per_s"] = speed.get(who, float("nan"))  # (a calculator teacher is not timed)
            return m

        model = r.teacher.calculator or r.teacher.preset or arch or ""
        rows = [R.Row("teacher", "teacher", metrics("teacher", "teacher"), model=model)]
        for name, spec in [("baseline", None)] + [(s.name, chosen[s.name]) for s in r.strategies]:
            run_name = "baseline" if spec is None else spec.name
            per_seed = [metrics(self.run_id(run_name, seed), "student") for seed in r.seeds]
            kind = "baseline" if spec is None else "distilled"
            rows.append(R.Row.over_seeds(name, kind, per_seed, r.seeds, model=r.student.preset or "",
                                         strategy="" if spec is None else spec.label()))
        return R.add_gaps(rows)

    def _teacher_note(self, rows: list) -> str:
        """What the teacher row means for a calculator teacher ("" for a model teacher)."""
        if self.recipe.teacher.calculator is None:
            return ""
        e, f = rows[0].metrics["energy_mae"], rows[0].metrics["force_mae"]
        text = (f"The teacher is the ASE calculator `{self.recipe.teacher.calculator}`, measured on the test split "
                f"as a model is (energy MAE {e:.3g} meV, force MAE {f:.3g} meV/Å)")
        if max(e, f) < REPRODUCES_LABELS:
            return text + (": it reproduces the test labels (it is the method that made them), so its row is the "
                           "reference itself, and gap closed is the share of the baseline's error that a run removes, "
                           "(baseline − run) / baseline.")
        return text + "; gap closed is measured against it as against a model teacher."

    def _intro(self, rows: list) -> str:
        """The report's first paragraph: recipe, teacher, student, data, sampled candidates."""
        r = self.recipe
        intro = (f"Recipe `{r.path}`; teacher `{r.teacher.describe()}`, "
                 f"student `{r.student.preset}`; test split `{r.data.test or 'demo'}`.")
        if r.data.sample is not None:
            counts = read_stage(self.out / "sampled")["outputs"]["counts"]
            sm = r.data.sample
            intro += (f" Sampled data: {counts['candidates']} candidates of the {counts['seed_structures']} "
                      f"{SAMPLE_SOURCES[sm['seeds']]} (`kdcache data sample`: {sm['per_seed']} per structure, rattle {sm['rattle']:g} Å, "
                      f"strain {sm['strain']:g}, minimum distance {sm['min_distance']:g} Å, seed {sm['seed']}), "
                      "without labels; the teacher labelled them once (`store-sampled/`). Runs marked "
                      "*sampled data* train on them in place of the training split.")
        note = self._teacher_note(rows)
        return intro + (" " + note if note else "")

    def _compared(self, folder: Path, rows: list, name: str, outputs: dict) -> str:
        """``report.compare_to``: the markdown section (and ``report-vs-NAME.csv``) of gap closed
        against run ``name`` of the same seed."""
        compared = R.against(rows, name)
        csv_name = f"report-vs-{name}.csv"
        R.write_csv(compared, folder / csv_name, config=self.recipe.name)
        outputs["csv_compared"] = csv_name
        return (f"## Against {name}\n\nGap closed against the run `{name}` of the same seed in place of the "
                f"baseline: ({name} − run) / ({name} − teacher), mean ± SE over seeds (also in `{csv_name}`).\n\n"
                + R.markdown_table(compared))

    def _write_report(self, folder: Path, rows: list, evals: dict, runs: dict, chosen: dict) -> dict:
        from kdcache.pipeline import plots as P
        from kdcache.pipeline.cka import linear_cka

        r = self.recipe
        title = r.report.get("title") or f"kdcache pipeline report: {r.name}"
        outputs = {"markdown": "report.md", "csv": "report.csv"}
        figs: dict[str, str] = {}
        extra = ""
        if r.report["plots"]:
            curves = {}
            # the reported runs of the first seed (a sweep's other λ and other seeds would crowd it)
            shown = {row.name: self.run_id(row.name if row.kind == "baseline" else chosen[row.name].name, r.seeds[0])
                     for row in rows if row.kind != "teacher"}
            for name, run in shown.items():
                res = runs[run]
                mfile = res.outputs.get("metrics")
                if mfile:
                    try:
                        curves[name] = P.read_curve(res.folder / mfile, "energy_mae")
                    except (OSError, ValueError) as exc:
                        self.log(f"  (no validation curve for {name}: {exc})")
            if curves:
                P.plot_curves(curves, folder / "val_energy_mae.png", title=r.name)
                figs["Validation energy MAE vs step"] = "val_energy_mae.png"
                outputs["curves"] = "val_energy_mae.png"
            preds = {}
            for name in ["teacher", *shown]:
                res = evals["teacher" if name == "teacher" else shown[name]]
                with np.load(res.folder / "predictions.npz") as z:
                    preds[name] = {k: z[k] for k in z.files}
            n_parity = len(next(iter(preds.values()))["energy_true"])
            n_test = int(rows[0].metrics.get("num_samples") or n_parity)
            note = (f"MAE over the first {n_parity} of {n_test} test samples and all their atoms "
                    f"(the table: all {n_test} samples, free atoms only)" if n_parity < n_test else
                    "MAE over all test samples and all atoms (the table's force MAE: free atoms only)")
            if len(r.seeds) > 1:
                note += f"; seed {r.seeds[0]}"
            P.plot_parity(preds, folder / "parity.png", note=note)
            figs["Predicted vs true energies and forces (test)"] = "parity.png"
            outputs["parity"] = "parity.png"
            # CKA on the same test atoms: students' node features vs each teacher feature
            with np.load(evals["teacher"].folder / "features.npz") as z:
                teacher_feats = {k: z[k] for k in z.files}
            n_atoms = int(np.load(evals["teacher"].folder / "predictions.npz")["natoms"][: r.report["cka_samples"]].sum())
            cols = [c for c in ("node", "e2n") if c in teacher_feats]
            names = list(shown)
            values = np.full((len(names), len(cols)), np.nan)
            for i, name in enumerate(names):
                with np.load(evals[shown[name]].folder / "features.npz") as z:
                    if "node" not in z.files:
                        continue
                    s = z["node"][:n_atoms]
                for j, c in enumerate(cols):
                    values[i, j] = linear_cka(s, teacher_feats[c][:n_atoms])
            if cols and names:
                P.plot_cka(values, names, cols, folder / "cka.png")
                figs["CKA similarity of node features, teacher vs students"] = "cka.png"
                outputs["cka"] = "cka.png"
                lines = ["| run | " + " | ".join(f"CKA vs teacher {c}" for c in cols) + " |",
                         "|---|" + "---|" * len(cols)]
                lines += [f"| {n} | " + " | ".join(f"{v:.3f}" for v in values[i]) + " |" for i, n in enumerate(names)]
                extra = f"Linear CKA on {n_atoms} test atoms:\n\n" + "\n".join(lines)
                np.savetxt(folder / "cka.csv", values, delimiter=",", header=",".join(cols), comments="")
        name = r.report.get("compare_to")
        if name:
            extra = self._compared(folder, rows, name, outputs) + ("\n\n" + extra if extra else "")
        R.write_markdown(rows, folder / "report.md", title, intro=self._intro(rows), plots=figs, extra=extra)
        R.write_csv(rows, folder / "report.csv", config=r.name)
        return outputs


def run_pipeline(recipe: str | Path | Recipe, out: str | Path | None = None, device: str | None = None,
                 log: Callable[[str], None] | None = None, jobs: int = 1) -> PipelineResult:
    """Run a recipe (a path or a loaded :class:`Recipe`); see the module docstring.

    Args:
        jobs: student runs trained side by side (processes; on a GPU they share it).
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    return Pipeline(recipe, out=out, device=device, log=log, jobs=jobs).run()


@dataclass
class StudentJob:
    """One student run of a pipeline (plain data: it travels to a worker process)."""

    run: str
    label: str
    folder: Path
    inputs: dict
    settings: dict
    device: str


def _student_stage(job: StudentJob, threads: int) -> tuple[StageResult, list[str]]:
    """A student stage in a worker process; its log lines go back to the parent."""
    from kdcache.runtime import set_cpu_threads

    set_cpu_threads(threads)
    lines: list[str] = []
    res = run_stage(job.label, job.folder, job.inputs, lambda f: B.train({**job.settings, "progress": False}, f, job.device),
                    log=lines.append)
    return res, lines
