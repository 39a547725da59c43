"""One schema for training settings (issue 11): `kdcache train` options, `train -c` files and a
recipe's `train:` sections accept and refuse the same values, and the options are the schema's."""

from __future__ import annotations

import copy

import pytest
from typer.testing import CliRunner

from kdcache.cli.main import app
from kdcache.errors import ConfigError
from kdcache.pipeline.recipe import PIPELINE_OWNED, parse_recipe
from kdcache.train.config import TrainConfig

RECIPE = {"data": {"demo": {"num_train": 8}}, "teacher": {"preset": "gemnet-oc-tiny", "train": {"max_steps": 1}},
          "students": {"preset": "painn-tiny"}, "strategies": ["n2n"]}

#: (setting, a value all three accept, one all three refuse), as a user types them
TABLE = [
    ("lr", "1e-3", "0"),
    ("batch_size", "4", "0"),
    ("max_steps", "3", "2.5"),
    ("seed", "2", "-1"),
    ("ema_decay", "0.5", "1"),
    ("warmup_factor", "0", "1.5"),
    ("energy_std", "2", "0"),
    ("scheduler", "plateau", "cosine"),
    ("labels", "both", "teachers"),
    ("feature_norm", "none", "l2"),
    ("student_map", "mlp", "conv"),
]


def _cli(tmp_path, args) -> tuple[bool, str]:
    """(accepted, the error line) of `kdcache train ARGS` on a dataset that does not exist: an
    accepted setting gets as far as opening the data."""
    res = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "missing.lmdb"), "--out", str(tmp_path / "run"),
                                   *args])
    assert res.exit_code != 0 and "Traceback" not in res.output, res.output
    return "missing.lmdb" in res.output, res.output


def _recipe(setting, text) -> tuple[bool, str]:
    from kdcache.config_yaml import loads_yaml

    raw = copy.deepcopy(RECIPE)
    raw["students"]["train"] = loads_yaml(f"{setting}: {text}\n", "value")
    try:
        parse_recipe(raw, "r.yaml")
    except ConfigError as exc:
        return False, str(exc)
    return True, ""


@pytest.mark.parametrize("setting, good, bad", TABLE)
def test_cli_config_file_and_recipe_agree(tmp_path, setting, good, bad):
    flag = "--" + setting.replace("_", "-")
    config = tmp_path / "run.yaml"
    for value, accepted in ((good, True), (bad, False)):
        config.write_text(f"{setting}: {value}\n")
        by_option, out = _cli(tmp_path, [flag, value])
        assert by_option == accepted, out
        by_file, out = _cli(tmp_path, ["-c", str(config)])
        assert by_file == accepted, out
        if not accepted:
            assert f"error: config file {config}: key '{setting}': " in out, out
        in_recipe, message = _recipe(setting, value)
        assert in_recipe == accepted, message
        if not accepted:
            assert message.startswith(f"recipe r.yaml: key 'students.train.{setting}': "), message


def test_the_options_are_the_schema():
    help_text = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "400"}).output
    for name, info in TrainConfig.model_fields.items():
        if name in ("student_overrides", "lr_milestones", "augment"):  # a mapping and lists: files only
            continue
        flag = "--" + ("lambda" if name == "lambda_" else name).replace("_", "-")
        assert flag in help_text, flag
    assert "--rotate" in help_text and "--no-rotate" in help_text  # one switch per augmentation
    assert "One of: constant, warmup_step, warmup_exp, plateau. (default: constant)" in help_text
    assert "Structures per step and process. (default: 8)" in help_text  # the field's description


def test_a_recipe_train_section_takes_every_setting_the_pipeline_does_not_set():
    from kdcache.pipeline.recipe import StudentSpec

    owned = {"student", "student_overrides", "data", "val", "store", "strategy", "lambda", "feature_loss", "out",
             "device"}
    assert set(PIPELINE_OWNED) - {"lambda_"} == owned
    every = {k: v for k, v in TrainConfig().to_dict().items() if k not in owned}
    spec = StudentSpec.model_validate({"preset": "painn-tiny", "train": every})
    assert spec.train == every  # defaults of every such setting pass, normalised to themselves
