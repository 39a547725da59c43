"""Hardening of `kdcache train` settings (issue 9): an invalid number on the command line or a
wrong value in a `train -c` file is refused before any work, in one line that names the option
(or the file and key) and the value, with exit code 1 and no traceback."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

from kdcache.cli.main import app
from kdcache.train.config import TrainConfig


def _refused(tmp_path, args) -> str:
    """`kdcache train ARGS` on a dataset that does not exist: a settings error must come first
    (before the data is opened or the run folder made)."""
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "missing.lmdb"), "--out", str(out), *args])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit), res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    assert not out.exists()
    return errors[0]


@pytest.mark.parametrize("args, message", [
    (["--lr", "-1"], "option --lr: must be > 0, got -1.0"),
    (["--lr", "0"], "option --lr: must be > 0, got 0.0"),
    (["--max-steps", "0"], "option --max-steps: must be >= 1, got 0"),
    (["--epochs", "-2"], "option --epochs: must be >= 1, got -2"),
    (["--batch-size", "0"], "option --batch-size: must be >= 1, got 0"),
    (["--lambda", "-0.5"], "option --lambda: must be >= 0, got -0.5"),
    (["--force-coef", "-1"], "option --force-coef: must be >= 0, got -1.0"),
    (["--num-workers", "-1"], "option --num-workers: must be >= 0, got -1"),
    (["--seed", "-3"], "option --seed: must be >= 0, got -3"),
    (["--lr", "nan"], "option --lr: must be finite, got nan"),
    (["--strategy", "n2n:-1"], "option --strategy: strategy 'n2n': weight -1.0 is negative"),
])
def test_invalid_numbers_on_the_command_line(tmp_path, args, message):
    assert _refused(tmp_path, args) == f"error: {message}"


@pytest.mark.parametrize("text, message", [
    ("batch_size: eight\n", "key 'batch_size': expected int, got 'eight'"),
    ("lr: 1e-3\nnormalize_labels: maybe\n", "key 'normalize_labels': expected true or false, got 'maybe'"),
    ("student: painn-tiny\nstudent_overrides: {hidden_channels: 8, wings: 2}\n",
     "key 'student_overrides.wings': painn takes no argument 'wings'"),
    ("student: painn-huge\n", "key 'student': unknown student 'painn-huge'"),
    ("augment: [rotate, mirror]\n", "key 'augment[1]': 'mirror' is not one of ['rotate']"),
    ("lr: 1e-3\nmax_steps: 10\nlr: 1e-2\n", "key 'lr' is given twice (lines 1 and 3); keep one"),
    ("learning_rate: 1\n", "key 'learning_rate': unknown setting"),
])
def test_wrong_values_in_a_config_file(tmp_path, text, message):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    line = _refused(tmp_path, ["-c", str(config)])
    assert line.startswith(f"error: config file {config}: ") and message in line, line


def test_the_command_line_names_its_own_values_and_yaml_floats_are_numbers(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 1e-4\nbatch_size: 4\n")  # `1e-4`: a float (PyYAML alone reads a string)
    assert _refused(tmp_path, ["-c", str(config), "--batch-size", "-4"]) == "error: option --batch-size: must be >= 1, got -4"
    cfg = TrainConfig.load(config, {"max_steps": 5})
    assert (cfg.lr, cfg.batch_size, cfg.max_steps) == (1e-4, 4, 5)


def test_every_setting_has_a_rule():
    # a new setting without a type (Any) would pass unchecked; the strategy alone is parsed on its own
    assert {n for n, f in TrainConfig.model_fields.items() if f.annotation is Any} == {"strategy"}
    assert all(f.description for f in TrainConfig.model_fields.values())  # its --help text
