"""Stage bookkeeping: skip when up to date, resume when interrupted, start over when inputs change."""

import json

import pytest

from kdcache.pipeline.stages import hash_inputs, read_stage, run_stage


def _work(calls, fail=False):
    def fn(folder):
        calls.append(folder.name)
        (folder / "partial.txt").write_text("x")
        if fail:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-stage
        (folder / "out.txt").write_text("done")
        return {"result": "out.txt", "value": 3}
    return fn


def test_skip_resume_and_rerun(tmp_path):
    logs, calls = [], []
    folder = tmp_path / "st"
    r1 = run_stage("s", folder, {"a": 1, "b": [1, 2]}, _work(calls), log=logs.append)
    assert not r1.skipped and calls == ["st"] and r1.outputs == {"result": "out.txt", "value": 3}
    assert read_stage(folder)["status"] == "done"

    r2 = run_stage("s", folder, {"b": [1, 2], "a": 1.0}, _work(calls), log=logs.append)  # same inputs (order, 1 == 1.0)
    assert r2.skipped and calls == ["st"] and r2.outputs["value"] == 3
    assert any(l.startswith("skip: s up to date") for l in logs)

    (folder / "out.txt").unlink()  # an output went missing -> run again
    run_stage("s", folder, {"a": 1, "b": [1, 2]}, _work(calls), log=logs.append)
    assert len(calls) == 2

    (folder / "keep.txt").write_text("stale")
    run_stage("s", folder, {"a": 2, "b": [1, 2]}, _work(calls), log=logs.append)  # changed input: fresh folder
    assert len(calls) == 3 and not (folder / "keep.txt").exists()
    assert any("inputs changed (a)" in l for l in logs)


def test_interrupted_stage_resumes_in_place(tmp_path):
    logs, calls = [], []
    folder = tmp_path / "st"
    with pytest.raises(KeyboardInterrupt):
        run_stage("s", folder, {"a": 1}, _work(calls, fail=True), log=logs.append)
    rec = json.loads((folder / "stage.json").read_text())
    assert rec["status"] == "running" and rec["input_hash"] == hash_inputs({"a": 1})

    seen = []

    def resume(folder):
        seen.append((folder / "partial.txt").exists())  # the partial work is still there to resume from
        (folder / "out.txt").write_text("done")
        return {"result": "out.txt"}

    r = run_stage("s", folder, {"a": 1}, resume, log=logs.append)
    assert seen == [True] and not r.skipped and read_stage(folder)["status"] == "done"
    assert any(l.startswith("resume: s") for l in logs)


def test_interrupted_stage_that_cannot_resume_starts_clean(tmp_path):
    folder = tmp_path / "st"
    with pytest.raises(KeyboardInterrupt):
        run_stage("s", folder, {"a": 1}, _work([], fail=True), log=[].append, resumable=False)
    seen, logs = [], []

    def fresh(folder):
        seen.append((folder / "partial.txt").exists())
        (folder / "out.txt").write_text("done")
        return {"result": "out.txt"}

    run_stage("s", folder, {"a": 1}, fresh, log=logs.append, resumable=False)
    assert seen == [False] and any(l.startswith("restart: s") for l in logs)
