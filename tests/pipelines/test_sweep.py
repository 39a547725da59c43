"""Seeds and λ sweeps in a recipe: one store, the teacher never loaded by the students, λ chosen
on the validation split (never the test split), statistics over seeds in the report."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from kdcache.cli.main import app
from kdcache.pipeline import runner as runner_mod
from kdcache.pipeline.report import read_csv

from .test_pipeline_e2e import TINY

SWEEP = {**TINY, "name": "sweep", "seeds": [0, 1],
         "strategies": [{"name": "n2n", "lambda": [0.5, 2.0]}, {"name": "vanilla2", "lambda": 1.0}]}


@pytest.mark.slow
def test_sweep_over_seeds_and_lambdas(tmp_path, monkeypatch):
    recipe = tmp_path / "sweep.yaml"
    recipe.write_text(yaml.safe_dump(SWEEP))
    out = tmp_path / "run"

    # record which split each evaluation reads, and which models the students' training builds
    evaluated: list[tuple[str, str]] = []
    real_evaluate = runner_mod.B.evaluate

    def spy_evaluate(ckpt, data, batch_size, device, fast="auto"):
        evaluated.append((str(ckpt), str(data)))
        return real_evaluate(ckpt, data, batch_size, device, fast)

    # the teacher (GemNet-OC) may run while it is trained and extracted, never in a student run
    from kdcache.models.gemnet_oc.model import GemNetOC
    from kdcache.store import extract as extract_mod

    built: list[str] = []
    teacher_used_by_students: list[str] = []
    real_train, real_init = runner_mod.B.train, GemNetOC.__init__

    def spy_train(settings, folder, device):
        built.append(settings["student"])
        student = settings["student"] != "gemnet-oc-tiny"

        def watched_init(self, *a, **kw):
            if student:
                teacher_used_by_students.append(str(folder))
            real_init(self, *a, **kw)

        def no_teacher(*a, **kw):
            teacher_used_by_students.append(str(folder))
            raise AssertionError("a student run loaded the teacher")

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(GemNetOC, "__init__", watched_init)
            if student:
                mp.setattr(extract_mod, "load_teacher", no_teacher)
            return real_train(settings, folder, device)

    monkeypatch.setattr(runner_mod.B, "evaluate", spy_evaluate)
    monkeypatch.setattr(runner_mod.B, "train", spy_train)

    res = CliRunner().invoke(app, ["pipeline", "run", str(recipe), "--out", str(out)])
    assert res.exit_code == 0, res.output

    # one store for every run; students are built from the student preset only
    assert sorted((out / "store").iterdir())  # the one store stage
    assert built == ["gemnet-oc-tiny"] + ["painn-tiny"] * (4 * 2)  # (baseline, n2n x 2 λ, vanilla2) x 2 seeds
    assert teacher_used_by_students == []
    runs = sorted(p.name for p in (out / "students").iterdir())
    assert runs == sorted(f"{n}_seed{s}" for n in ("baseline", "n2n_lam0.5", "n2n_lam2", "vanilla2") for s in (0, 1))
    for run in runs:
        cfg = yaml.safe_load((out / "students" / run / "config.yaml").read_text())
        assert cfg["seed"] == int(run[-1])
        if not run.startswith("baseline"):
            assert cfg["store"] == str(out / "store" / "teacher.zarr")

    # λ is chosen on the validation split: the candidates are evaluated there, and only the
    # chosen λ is evaluated on the test split
    val, test = str(out / "data" / "val.lmdb"), str(out / "data" / "test.lmdb")
    n2n_on = {data for ckpt, data in evaluated if "/n2n_lam" in ckpt}
    assert val in n2n_on
    tested = {ckpt.split("/students/")[1].split("/")[0] for ckpt, data in evaluated
              if data == test and "/students/" in ckpt}
    n2n_tested = {t.rsplit("_seed", 1)[0] for t in tested if t.startswith("n2n")}
    assert len(n2n_tested) == 1
    chosen = n2n_tested.pop()
    # the choice is the candidate with the lower validation score
    def score(lam_run):
        total = 0.0
        for s in (0, 1):
            m = json.loads((out / "eval-val" / f"{lam_run}_seed{s}" / "metrics.json").read_text())
            b = json.loads((out / "eval-val" / f"baseline_seed{s}" / "metrics.json").read_text())
            total += m["energy_mae"] / b["energy_mae"] + m["force_mae"] / b["force_mae"]
        return total
    assert chosen == min(("n2n_lam0.5", "n2n_lam2"), key=score)

    # the report: one row per strategy at its chosen λ, statistics over the two seeds
    rows = {r["run"]: r for r in read_csv(out / "report" / "report.csv")}
    assert set(rows) == {"teacher", "baseline", "n2n", "vanilla2"}
    assert rows["n2n"]["strategy"] == f"n2n (λ={chosen.removeprefix('n2n_lam')})"
    assert rows["baseline"]["seeds"] == "0 1"
    base = [json.loads((out / "eval" / f"baseline_seed{s}" / "metrics.json").read_text()) for s in (0, 1)]
    assert float(rows["baseline"]["energy_mae"]) == pytest.approx((base[0]["energy_mae"] + base[1]["energy_mae"]) / 2)
    teacher = json.loads((out / "eval" / "teacher" / "metrics.json").read_text())
    dist = [json.loads((out / "eval" / f"vanilla2_seed{s}" / "metrics.json").read_text()) for s in (0, 1)]
    for key in ("energy_mae", "force_mae"):
        mean_base = (base[0][key] + base[1][key]) / 2
        if teacher[key] < mean_base:  # a gap to close (of the mean baseline)
            gaps = [(b[key] - d[key]) / (mean_base - teacher[key]) for b, d in zip(base, dist)]
            assert float(rows["vanilla2"][f"gap_closed_{key}"]) == pytest.approx(sum(gaps) / 2)
            se = abs(gaps[0] - gaps[1]) / 2  # sd/sqrt(2) of two values
            assert float(rows["vanilla2"][f"gap_closed_{key}_se"]) == pytest.approx(se)
            assert rows["vanilla2"][f"gap_closed_{key}_verdict"] in ("gain", "noise", "worse")
    # one throughput figure per architecture: the same for every student row
    assert len({rows[n]["samples_per_s"] for n in ("baseline", "n2n", "vanilla2")}) == 1
    assert "seeds" in res.output and "beyond noise:" in res.output


@pytest.mark.slow
def test_jobs_run_students_side_by_side_and_resume_alike(tmp_path):
    recipe = tmp_path / "jobs.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "name": "jobs", "seeds": [0, 1]}))
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["pipeline", "run", str(recipe), "--out", str(out), "--jobs", "2"])
    assert res.exit_code == 0, res.output
    assert "4 runs, 2 at a time" in res.output
    for run in ("baseline_seed0", "baseline_seed1", "n2n_seed0", "n2n_seed1"):
        assert json.loads((out / "students" / run / "stage.json").read_text())["status"] == "done"
        assert (out / "students" / run / "best.pt").is_file()
    # how many ran at once does not change what a run is: a second run skips every stage
    again = CliRunner().invoke(app, ["pipeline", "run", str(recipe), "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert "run: " not in again.output
