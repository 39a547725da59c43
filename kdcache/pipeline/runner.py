"""``kdcache pipeline run``: data -> teacher -> store -> students -> evaluation -> report.

Layout of a run folder (default ``runs/<recipe name>``)::

    recipe.yaml              the recipe as run (for the record)
    data/                    demo data (only for ``data: {demo: ...}``)
    teacher/                 teacher training run (only when the recipe trains it)
    store/teacher.zarr       the teacher's feature store, extracted once
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

from kdcache.errors import ConfigError
from kdcache.pipeline import backends as B
from kdcache.pipeline import report as R
from kdcache.pipeline.recipe import ARCH_FEATURES, Recipe, StrategySpec, load_recipe, strategy_needs
from kdcache.pipeline.stages import StageResult, file_sha256, path_fingerprint, run_stage

#: training settings that do not change a run's result (left out of its stage hash)
_NOT_RESULT = ("progress", "num_workers", "checkpoint_every", "val_batch_size")


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


def resolve_store_features(recipe: Recipe, teacher_arch: str | None) -> tuple[str, ...]:
    """The store's ``--features``: as given, or (``auto``) every target the teacher can give.

    ``auto`` stores all of them, not only what today's strategies read: the store is then the
    same whichever strategies the recipe lists, so adding a strategy later trains one student
    instead of re-extracting the store and re-training every distilled student.
    """
    if recipe.store.features:
        feats = recipe.store.features
    else:
        needed: list[str] = []
        for s in recipe.strategies:
            for strat in s.terms:
                for f in strategy_needs(strat, teacher_arch):
                    if f not in needed:
                        needed.append(f)
        if teacher_arch in ARCH_FEATURES:
            offered = [f for f in ARCH_FEATURES[teacher_arch] if f != "edge"] + ["atom_energy", "outputs"]
            needed = offered + [f for f in needed if f not in offered]
        feats = tuple(needed)
    if teacher_arch in ARCH_FEATURES:
        have = set(ARCH_FEATURES[teacher_arch]) | {"atom_energy", "outputs"}
        missing = [f for f in feats if f not in have]
        if missing:
            raise ConfigError(f"recipe {recipe.path}: key 'store.features': a {teacher_arch} teacher has no {missing}")
    for s in recipe.strategies:
        for strat in s.terms:
            lacking = [f for f in strategy_needs(strat, teacher_arch) if f not in feats]
            if lacking:
                raise ConfigError(
                    f"recipe {recipe.path}: key 'store.features': strategy {strat!r} (run {s.name!r}) reads {lacking}, "
                    f"which the store would not hold ({list(feats)})")
    return tuple(feats)


class Pipeline:
    """Runs one recipe. ``log`` receives every progress line (default: print)."""

    def __init__(self, recipe: Recipe, out: str | Path | None = None, device: str | None = None,
                 log: Callable[[str], None] | None = None):
        self.recipe = recipe
        self.out = Path(out) if out is not None else recipe.out
        self.device = B.resolve_device(device or recipe.device)
        self.log = log or (lambda msg: print(msg, flush=True))
        self.stages: list[StageResult] = []

    def _stage(self, name, folder, inputs, fn, resumable: bool = True) -> StageResult:
        res = run_stage(name, folder, inputs, fn, log=self.log, resumable=resumable)
        self.stages.append(res)
        return res

    # --- steps ------------------------------------------------------------------------------
    def data(self) -> tuple[dict, dict]:
        """Dataset paths and their identities (what downstream hashes depend on)."""
        d = self.recipe.data
        if d.demo is not None:
            folder = self.out / "data"
            demo = dict(d.demo)
            res = self._stage("data (demo)", folder, {"demo": demo},
                              lambda f: B.make_demo_data(f, demo["num_train"], demo["num_val"], demo["num_test"],
                                                         demo["seed"]), resumable=False)
            paths = {k: str(folder / res.outputs[k]) for k in ("train", "val", "test")}
            ids = {k: {"demo": res.input_hash, "split": k} for k in paths}
            return paths, ids
        paths = {"train": d.train, "val": d.val, "test": d.test}
        for k, p in paths.items():
            if not Path(p).exists():
                raise ConfigError(f"recipe {self.recipe.path}: key 'data.{k}': {p} does not exist")
        return paths, {k: path_fingerprint(p) for k, p in paths.items()}

    def teacher(self, paths: dict, ids: dict) -> tuple[Path, dict, str | None]:
        """Teacher checkpoint, its identity and its architecture (registry name)."""
        t = self.recipe.teacher
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

    def store(self, ckpt: Path, teacher_id: dict, arch: str | None, paths: dict, ids: dict) -> tuple[Path | None, str | None]:
        if not self.recipe.strategies:
            return None, None
        feats = resolve_store_features(self.recipe, arch)
        st = self.recipe.store
        # extraction batch size is part of a store's identity (stage one resumes only with the same)
        inputs = {"teacher": teacher_id, "data": ids["train"], "features": sorted(feats), "dtype": st.dtype,
                  "batch_size": st.batch_size, "options": st.options}
        res = self._stage(
            "store (extract teacher features)", self.out / "store", inputs,
            lambda f: (B.extract(ckpt, self.recipe.teacher.preset, paths["train"], f / "teacher.zarr", feats,
                                 st.dtype, st.batch_size, self.device, st.options) or {"store": "teacher.zarr"}),
        )
        return self.out / "store" / "teacher.zarr", res.input_hash

    def student(self, spec: StrategySpec | None, paths: dict, ids: dict, store: Path | None,
                store_hash: str | None) -> StageResult:
        r = self.recipe
        name = "baseline" if spec is None else spec.name
        train = r.student_train(spec)
        settings = {**train, "student": r.student.preset, "student_overrides": r.student.overrides,
                    "data": paths["train"], "val": paths["val"]}
        inputs = {"preset": r.student.preset, "overrides": r.student.overrides, "train": _result_settings(train),
                  "data": {"train": ids["train"], "val": ids["val"]}}
        if spec is None:
            settings["strategy"] = "none"
            inputs["strategy"] = "none"
        else:
            settings.update(strategy=spec.strategy_string, feature_loss=spec.loss, store=str(store))
            inputs.update(strategy=spec.terms, loss=spec.loss, store=store_hash)
        label = "student baseline (no distillation)" if spec is None else f"student {name} ({spec.label()})"
        return self._stage(label, self.out / "students" / name, inputs, lambda f: B.train(settings, f, self.device))

    def evaluate(self, name: str, ckpt: Path, model_id, test_path: str, test_id, is_teacher: bool) -> StageResult:
        r = self.recipe
        n_feat = max(r.report["cka_samples"], r.report["parity_samples"])
        feats = ("node", "e2n") if is_teacher else ("node",)
        inputs = {"model": model_id, "test": test_id, "batch_size": r.eval["batch_size"],
                  "samples": n_feat, "features": list(feats)}

        def fn(folder: Path) -> dict:
            # predictions/features first: that pass also warms up (allocator, lazy set-up), so the
            # throughput measured by the evaluation is not charged with first-call costs
            preds, hidden = B.collect(ckpt, test_path, n_feat, r.eval["batch_size"], self.device, feats)
            np.savez(folder / "predictions.npz", **preds)
            np.savez(folder / "features.npz", **hidden)
            metrics = B.evaluate(ckpt, test_path, r.eval["batch_size"], self.device)
            (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
            self.log("  " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float))))
            return {"metrics": "metrics.json", "predictions": "predictions.npz", "features": "features.npz"}

        return self._stage(f"eval {name} (test split)", self.out / "eval" / name, inputs, fn, resumable=False)

    # --- whole run ------------------------------------------------------------------------------
    def run(self) -> PipelineResult:
        r = self.recipe
        t0 = time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "recipe.yaml").write_text(yaml.safe_dump(r.raw, sort_keys=False))
        n_students = 1 + len(r.strategies)
        self.log(f"pipeline {r.name}: {r.path} -> {self.out} (device {self.device}; "
                 f"teacher {r.teacher.preset or r.teacher.checkpoint}, {n_students} students of {r.student.preset})")

        paths, ids = self.data()
        ckpt, teacher_id, arch = self.teacher(paths, ids)
        store, store_hash = self.store(ckpt, teacher_id, arch, paths, ids)

        runs: dict[str, tuple[Path, StageResult, StrategySpec | None]] = {}
        for i, spec in enumerate([None] + list(r.strategies)):
            name = "baseline" if spec is None else spec.name
            self.log(f"[{i + 1}/{n_students}] student {name}")
            res = self.student(spec, paths, ids, store, store_hash)
            runs[name] = (res.folder / res.outputs["checkpoint"], res, spec)

        evals = {"teacher": self.evaluate("teacher", ckpt, teacher_id, paths["test"], ids["test"], True)}
        for name, (sckpt, res, _) in runs.items():
            evals[name] = self.evaluate(name, sckpt, res.input_hash, paths["test"], ids["test"], False)

        rows = self._rows(evals, runs, arch)
        rep = self._stage("report", self.out / "report",
                          {"evals": {k: v.input_hash for k, v in evals.items()}, "report": r.report,
                           "rows": [[row.name, row.kind, row.strategy] for row in rows]},
                          lambda f: self._write_report(f, rows, evals, runs), resumable=False)
        R.add_gaps(rows)
        self.log("")
        self.log(R.gap_table_text(rows, title=f"{r.name}: share of the student-teacher gap closed (test split)"))
        self.log(f"\nreport: {rep.folder / 'report.md'}  ({time.time() - t0:.1f}s)")
        return PipelineResult(self.out, rows, self.stages, rep.folder / "report.md", rep.folder / "report.csv")

    def _rows(self, evals: dict, runs: dict, arch: str | None) -> list[R.Row]:
        r = self.recipe
        rows = []
        for name, res in evals.items():
            metrics = json.loads((res.folder / "metrics.json").read_text())
            if name == "teacher":
                rows.append(R.Row("teacher", "teacher", metrics, model=r.teacher.preset or arch or ""))
            elif name == "baseline":
                rows.append(R.Row("baseline", "baseline", metrics, model=r.student.preset or ""))
            else:
                spec = runs[name][2]
                rows.append(R.Row(name, "distilled", metrics, strategy=spec.label(), model=r.student.preset or ""))
        return R.add_gaps(rows)

    def _write_report(self, folder: Path, rows: list, evals: dict, runs: dict) -> dict:
        from kdcache.pipeline import plots as P
        from kdcache.pipeline.cka import linear_cka

        r = self.recipe
        title = r.report.get("title") or f"kdcache pipeline report: {r.name}"
        outputs = {"markdown": "report.md", "csv": "report.csv"}
        figs: dict[str, str] = {}
        extra = ""
        if r.report["plots"]:
            curves = {}
            for name, (_, res, _) in runs.items():
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
            for name, res in evals.items():
                with np.load(res.folder / "predictions.npz") as z:
                    preds[name] = {k: z[k] for k in z.files}
            P.plot_parity(preds, folder / "parity.png")
            figs["Predicted vs true energies and forces (test)"] = "parity.png"
            outputs["parity"] = "parity.png"
            # CKA on the same test atoms: students' node features vs each teacher feature
            with np.load(evals["teacher"].folder / "features.npz") as z:
                teacher_feats = {k: z[k] for k in z.files}
            n_atoms = int(np.load(evals["teacher"].folder / "predictions.npz")["natoms"][: r.report["cka_samples"]].sum())
            cols = [c for c in ("node", "e2n") if c in teacher_feats]
            names = [n for n in evals if n != "teacher"]
            values = np.full((len(names), len(cols)), np.nan)
            for i, name in enumerate(names):
                with np.load(evals[name].folder / "features.npz") as z:
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
        intro = (f"Recipe `{r.path}`; teacher `{r.teacher.preset or r.teacher.checkpoint}`, "
                 f"student `{r.student.preset}`; test split `{r.data.test or 'demo'}`.")
        R.write_markdown(rows, folder / "report.md", title, intro=intro, plots=figs, extra=extra)
        R.write_csv(rows, folder / "report.csv", config=r.name)
        return outputs


def run_pipeline(recipe: str | Path | Recipe, out: str | Path | None = None, device: str | None = None,
                 log: Callable[[str], None] | None = None) -> PipelineResult:
    """Run a recipe (a path or a loaded :class:`Recipe`); see the module docstring."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    return Pipeline(recipe, out=out, device=device, log=log).run()
