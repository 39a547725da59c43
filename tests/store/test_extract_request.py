"""One schema for extraction (kdcache.store.request): the command line, the Python API and the
check of a recipe's store.options take their names, defaults and rules from ExtractRequest, and a
store's `request` attribute is the StoreRecord a resume is checked against."""

from __future__ import annotations

import inspect
import shutil

import pytest
import typer

from kdcache.cli.main import app
from kdcache.errors import ConfigError, StoreError
from kdcache.settings import is_switch_or_auto
from kdcache.store import FeatureStore
from kdcache.store.extract import extract
from kdcache.store.request import ExtractRequest, StoreRecord, check_settings

from .conftest import PAINN_ARGS


def test_api_and_command_line_defaults_are_the_schemas():
    fields = ExtractRequest.model_fields
    params = inspect.signature(extract).parameters
    assert list(params) == list(fields)
    for name, p in params.items():
        want = inspect.Parameter.empty if fields[name].is_required() else fields[name].default
        assert p.default == want, name
    command = next(c for c in app.registered_commands if c.name == "extract").callback
    options = inspect.signature(command).parameters
    assert list(options) == list(fields)
    for name, p in options.items():
        if is_switch_or_auto(fields[name].annotation):  # --x / --no-x; neither (None) is the default, auto
            assert p.default.default is None and fields[name].default == "auto", name
            continue
        assert p.default.default == (... if fields[name].is_required() else fields[name].default), name


def test_help_lists_each_choice_and_the_strategies_that_read_a_feature():
    command = typer.main.get_command(app).commands["extract"]
    helps = {p.name: p.help for p in command.params}
    assert helps["dtype"] == "Hidden-feature dtype. One of: float16, bfloat16, float32. (default: float16)"
    assert helps["batch_size"].endswith("(default: 16)")
    assert "e2v (v2v), vector (v2v), atom_energy (vanilla2), outputs (vanilla1)" in helps["features"]


@pytest.mark.parametrize("settings, key, what", [
    (dict(codec="lzma"), "codec", "'lzma' is not one of none, zstd, blosc-lz4"),
    (dict(batch_size=0), "batch_size", "must be positive, got 0"),
    (dict(batch_size="8"), "batch_size", "expected int, got '8'"),
    (dict(shard_atoms=100, chunk_atoms=64), "shard_atoms", "shard_atoms (100) must be a multiple of chunk_atoms (64)"),
])
def test_bad_settings_name_their_option(tmp_path, settings, key, what):
    with pytest.raises(ConfigError) as exc:
        extract(tmp_path / "data.lmdb", tmp_path / "s.zarr", teacher="painn-tiny", **settings)
    assert str(exc.value) == f"--{key.replace('_', '-')}: {what}"
    assert not any(tmp_path.iterdir())
    # a recipe's store.options meet the same rules, named by the recipe's key
    with pytest.raises(ConfigError) as exc:
        ExtractRequest.check_options(settings, lambda k: f"key 'store.options.{k}'")
    assert str(exc.value) == f"key 'store.options.{key}': {what}"


def test_good_settings_pass_and_features_are_parsed_once():
    check_settings({"codec": "zstd", "shard_atoms": 64, "chunk_atoms": 8})
    assert ExtractRequest.of(data="d.lmdb", out="s.zarr", features=" node, ,e2v ").features == ("node", "e2v")
    assert ExtractRequest.of(data="d.lmdb", out="s.zarr", features=["outputs"]).features == ("outputs",)
    with pytest.raises(ConfigError, match=r"^unknown feature\(s\) \['k2k'\]; choose from"):
        ExtractRequest.of(data="d.lmdb", out="s.zarr", features="node,k2k")


def test_the_store_records_what_decides_its_values(painn_ref_store, mol_lmdb, painn_ckpt, tmp_path):
    recorded = FeatureStore.open(painn_ref_store).provenance["request"]
    assert StoreRecord.model_validate(recorded).as_attrs() == recorded
    assert (recorded["batch_size"], recorded["codec"], recorded["shard_atoms"]) == (3, "none", 16)
    assert recorded["num_samples"] == 14 and recorded["dtypes"]["vector"] == "float16"
    out = tmp_path / "copy.zarr"
    shutil.copytree(painn_ref_store, out)
    # settings outside the record (device, progress) may change: the finished store is taken as it is
    res = extract(mol_lmdb, out, checkpoint=str(painn_ckpt), device="cpu", progress=True, **PAINN_ARGS)
    assert res.groups_written == 0
    with pytest.raises(StoreError, match=r"different settings \(teacher_dtype: store has \"float32\", this run \"float64\""):
        extract(mol_lmdb, out, checkpoint=str(painn_ckpt), teacher_dtype="float64", progress=False, **PAINN_ARGS)
