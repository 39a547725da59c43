"""Hardening of recipes (issue 9): a checkpoint is data, never code; a duplicated YAML key, a
wrong `store.options` value or a bad training value is refused by `kdcache pipeline validate`
(and `run`) with one line naming the file and the key, and nothing runs."""

from __future__ import annotations

import pathlib
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from kdcache.cli.main import app
from kdcache.config_yaml import loads_yaml
from kdcache.errors import ConfigError


class _TouchOnUnpickle:
    """Unpickling this calls ``Path.touch(marker)``: any loader that runs a file's code shows."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _recipe(tmp_path, teacher: str, extra: str = "") -> pathlib.Path:
    """A recipe on three (empty) data files: enough to reach the teacher step of `run`."""
    for split in ("train", "val", "test"):
        (tmp_path / f"{split}.lmdb").write_bytes(b"")
    f = tmp_path / "r.yaml"
    f.write_text(textwrap.dedent(f"""\
        data: {{train: {tmp_path}/train.lmdb, val: {tmp_path}/val.lmdb, test: {tmp_path}/test.lmdb}}
        teacher: {teacher}
        students: {{preset: painn-tiny}}
        strategies: [n2n]
    """) + extra)
    return f


def _refused(args) -> str:
    """Run the command; it must fail with exit 1 and one `error:` line, without a traceback."""
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit), res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    return errors[0]


def test_code_in_a_recipe_checkpoint_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "teacher.pt"
    torch.save({"format": "kdcache", "model": "painn", "payload": _TouchOnUnpickle(marker)}, ckpt)
    # the file really carries code: a full unpickling (never done by kdcache) creates the marker
    probe = tmp_path / "probe.pt"
    torch.save({"payload": _TouchOnUnpickle(tmp_path / "probe-ran")}, probe)
    torch.load(probe, weights_only=False)
    assert (tmp_path / "probe-ran").exists()

    f = _recipe(tmp_path, f"{{preset: painn-tiny, checkpoint: {ckpt}}}")
    line = _refused(["pipeline", "validate", str(f)])
    assert line.startswith(f"error: recipe {f}: key 'teacher.checkpoint': checkpoint {ckpt}: cannot be read"), line
    assert "never code" in line
    line = _refused(["pipeline", "run", str(f), "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert f"checkpoint {ckpt}: cannot be read as a weights-only torch file" in line, line
    assert not marker.exists()
    assert not (tmp_path / "run" / "store").exists() and not (tmp_path / "run" / "students").exists()


@pytest.mark.parametrize("extra, message", [
    ("store:\n  dtype: float16\n  dtype: float32\n",
     "key 'store.dtype' is given twice (lines 6 and 7); keep one"),
    ("store: {options: {shard_atoms: lots}}\n", "key 'store.options.shard_atoms': expected int, got 'lots'"),
    ("store: {options: {overwrite: 1}}\n", "key 'store.options.overwrite': expected true or false, got 1"),
    ("store: {options: {out: elsewhere}}\n", "key 'store.options.out': is set by the recipe's `out`"),
    ("store: {options: {shards: 2}}\n", "key 'store.options.shards': not a setting of kdcache extract"),
])
def test_validate_names_file_and_key(tmp_path, extra, message):
    f = _recipe(tmp_path, "{preset: painn-tiny, train: {max_steps: 2}}", extra)
    line = _refused(["pipeline", "validate", str(f)])
    assert line.startswith(f"error: recipe {f}: ") and message in line, line


@pytest.mark.parametrize("train, message", [
    ("{lr: -1}", "key 'students.train.lr': must be > 0, got -1"),
    ("{max_steps: 0}", "key 'students.train.max_steps': must be >= 1, got 0"),
    ("{batch_size: 2.5}", "key 'students.train.batch_size': expected int, got 2.5"),
    ("{ema_decay: 1}", "key 'students.train.ema_decay': must be < 1, got 1"),
    ("{lr_milestones: [10, -5]}", "key 'students.train.lr_milestones[1]': must be >= 0, got -5"),
])
def test_bad_training_values_are_refused_before_running(tmp_path, train, message):
    f = tmp_path / "r.yaml"
    f.write_text(f"data: {{demo: {{}}}}\nteacher: {{preset: gemnet-oc-tiny, train: {{max_steps: 1}}}}\n"
                 f"students: {{preset: painn-tiny, train: {train}}}\n")
    assert message in _refused(["pipeline", "validate", str(f)])
    assert message in _refused(["pipeline", "run", str(f), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()  # nothing ran


def test_yaml_reader():
    # YAML 1.2 floats (PyYAML alone reads `1e-4` and `1.0e5` as strings); strings stay strings
    assert loads_yaml("a: 1e-4\nb: 1.0e5\nc: 2\nd: '1e-4'\ne: v1e4\n", "t") == \
        {"a": 1e-4, "b": 1e5, "c": 2, "d": "1e-4", "e": "v1e4"}
    # a key repeated inside a list item, with its path; merge keys may be overridden
    with pytest.raises(ConfigError, match=r"^f\.yaml: key 'strategies\[1\]\.name' is given twice \(line 3\)"):
        loads_yaml("strategies:\n  - {name: a}\n  - {name: b, name: c}\n", "f.yaml")
    assert loads_yaml("base: &b {lr: 1}\nrun:\n  <<: *b\n  lr: 2\n", "t") == {"base": {"lr": 1}, "run": {"lr": 2}}
    with pytest.raises(ConfigError, match=r"^f\.yaml: not valid YAML \(line 2, column 1: .*expected ','") as exc:
        loads_yaml("a: [1, 2\n", "f.yaml")
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="constructor for the tag"):  # plain data only
        loads_yaml("a: !!python/object/apply:os.system ['true']\n", "f.yaml")
