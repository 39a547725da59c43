"""`kdcache data info` text and JSON, and the help texts."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from kdcache.cli.main import app
from kdcache.data import dataset_statistics, open_dataset
from kdcache.data.lmdb_writer import write_lmdb

from .conftest import make_record


def test_info_json_values(tmp_path):
    recs = [make_record(n=4, seed=0), make_record(n=6, seed=1)]
    recs[1]["atomic_numbers"] = torch.tensor([1.0, 6, 6, 8, 29, 29])
    write_lmdb(tmp_path / "x.lmdb", recs)
    result = CliRunner().invoke(app, ["data", "info", str(tmp_path / "x.lmdb"), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["num_samples"] == 2 and info["num_atoms"] == 10
    assert info["elements"] == [1, 6, 8, 29]
    assert info["energy_mean"] == pytest.approx((-1.25 - 2.5) / 2)
    f = torch.cat([recs[0]["force"], recs[1]["force"]]).double()
    assert info["force_rms"] == pytest.approx(f.pow(2).mean().sqrt().item(), rel=1e-6)
    assert info["force_max"] == pytest.approx(f.norm(dim=1).max().item(), rel=1e-6)
    assert info["periodic"] is True and info["atoms_min"] == 4 and info["atoms_max"] == 6
    assert info["fixed_fraction"] == pytest.approx((2 + 3) / 10)
    assert info["kind"] == "lmdb" and info["files"][0]["name"] == "x.lmdb"
    stats = dataset_statistics(open_dataset(tmp_path / "x.lmdb"))
    assert stats["energy_std"] == pytest.approx(0.625)


def test_info_text_molecules(coll_file):
    result = CliRunner().invoke(app, ["data", "info", str(coll_file), "--energy-key", "atomization_energy"])
    assert result.exit_code == 0, result.output
    assert "samples        2" in result.output and "periodic       False" in result.output
    assert "H(1), C(6), O(8)" in result.output and "mean -6.755" in result.output


@pytest.mark.parametrize("cmd", [["data"], ["data", "info"], ["data", "convert"], ["data", "demo"]])
def test_help(cmd):
    result = CliRunner().invoke(app, [*cmd, "--help"])
    assert result.exit_code == 0
    assert len(result.output) > 200 and "Usage" in result.output
