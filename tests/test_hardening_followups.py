"""Hardening follow-ups (issue 9), each through the `kdcache` command: code-carrying checkpoints
are named without torch's advice to run them, `store verify --data` says why the dataset was not
compared, `data convert` checks values and keeps existing files, `pipeline validate` checks
`store.options` values and `out`, and a store whose metadata was edited is refused."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import textwrap
import warnings

import numpy as np
import pytest
from typer.testing import CliRunner

from kdcache.cli.main import app
from kdcache import keys as K


def kdcache(*args):
    """(exit code, output, error lines) of one `kdcache` command run in this process."""
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    return res.exit_code, res.output, errors


def refused(*args) -> str:
    """The one `error:` line of a command that must fail with exit code 1."""
    code, out, errors = kdcache(*args)
    assert code == 1 and len(errors) == 1, out
    return errors[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Six labelled 4-atom molecules (an OC20-format LMDB)."""
    from ase import Atoms

    from kdcache.data.lmdb_writer import atoms_to_record, write_lmdb

    rng = np.random.default_rng(3)
    recs = [atoms_to_record(Atoms(numbers=rng.choice([1, 6, 8], size=4), positions=rng.uniform(0, 3.0, (4, 3)),
                                  cell=np.eye(3) * 10.0, pbc=False),
                            energy=float(rng.normal()), forces=rng.normal(size=(4, 3))) for _ in range(6)]
    path = tmp_path_factory.mktemp("data") / "mols.lmdb"
    write_lmdb(path, recs)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("store") / "s.zarr"
    code, text, _ = kdcache("extract", "--teacher", "painn-tiny", "--data", data, "--out", out, "--device", "cpu",
                            "--batch-size", 6, "--no-progress")
    assert code == 0, text
    return out


# --- checkpoints --------------------------------------------------------------------------------------
class _System:
    """Unpickling this would run ``os.system`` (pickled as the global ``posix.system``)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind, reason", [
    ("torch", "Trying to load unsupported GLOBAL posix.system whose module posix is blocked"),
    ("raw pickle", "Unsupported operand 149"),  # protocol 4's FRAME, which the safe unpickler lacks
])
def test_code_carrying_checkpoint_is_named_without_advice_to_run_it(tmp_path, data, kind, reason):
    import torch

    marker, ckpt = tmp_path / "pwned", tmp_path / "evil.pt"
    if kind == "torch":
        torch.save({"model": "painn", "x": _System(marker)}, ckpt)
    else:
        ckpt.write_bytes(pickle.dumps({"model": "painn", "x": _System(marker)}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = refused("eval", ckpt, "--data", data)
    assert line == (f"error: checkpoint {ckpt}: cannot be read as a weights-only torch file (the weights-only "
                    f"unpickler refused it: {reason}; a checkpoint is data, never code)")
    assert not [w for w in caught if "pickle protocol" in str(w.message)]  # torch's protocol warning
    assert not marker.exists()


# --- stores -------------------------------------------------------------------------------------------
def test_verify_says_why_the_dataset_was_not_compared(store, data, tmp_path):
    from kdcache.store import FeatureStore

    damaged = tmp_path / "s.zarr"
    shutil.copytree(store, damaged)
    energy = FeatureStore(damaged, load_samples=False).data_file(K.ENERGY, 0)
    raw = bytearray(energy.read_bytes())
    raw[3] ^= 0xFF
    energy.write_bytes(bytes(raw))
    code, out, _ = kdcache("store", "verify", damaged, "--data", data)
    assert code == 1 and "DAMAGED    " in out, out
    assert ("dataset    not checked: skipped, the store's per-sample arrays are damaged (its sample hashes cannot be "
            "trusted)") in out.splitlines()
    assert "no --data" not in out
    code, out, _ = kdcache("store", "verify", damaged)
    assert "dataset    not checked (no --data)" in out.splitlines()


def test_store_with_edited_metadata_is_refused(store, data, tmp_path):
    # kdcache's own store opens (the identity is recomputed as finalize computed it)
    code, out, _ = kdcache("store", "info", store)
    assert code == 0, out
    edited = tmp_path / "s.zarr"
    shutil.copytree(store, edited)
    meta = json.loads((edited / "zarr.json").read_text())
    meta["attributes"]["kdcache"]["teacher"]["name"] = "gemnet_oc"
    (edited / "zarr.json").write_text(json.dumps(meta))
    line = refused("train", "--student", "painn-tiny", "--store", edited, "--data", data, "--strategy", "n2n",
                   "--max-steps", 1, "--batch-size", 2, "--device", "cpu", "--no-progress", "--out", tmp_path / "run")
    assert (f"{edited}: its metadata (zarr.json attributes or an array's zarr.json) changed since it was written "
            "(identity ") in line and "`kdcache store verify` shows it" in line, line
    assert not (tmp_path / "run" / "last.pt").exists()
    code, out, _ = kdcache("store", "verify", edited)  # verify reports it rather than refusing to look
    assert code == 1 and "DIFFERS: the store's metadata changed since it was written" in out, out


# --- data convert -------------------------------------------------------------------------------------
def _extxyz(path, force=1.0):
    """Three water molecules; molecule 1 has one force component ``force``."""
    mols = []
    for i in range(3):
        f = force if i == 1 else 1.0
        mols.append(textwrap.dedent(f"""\
            3
            Properties=species:S:1:pos:R:3:forces:R:3 energy={-1.5 * (i + 1)} pbc="F F F"
            O 0.0 0.0 0.119 0.0 0.0 {f}
            H 0.0 0.763 -0.477 0.0 0.5 -0.5
            H 0.0 -0.763 -0.477 0.0 -0.5 -0.5
            """))
    path.write_text("".join(mols))
    return path


def test_convert_refuses_values_beyond_float32(tmp_path):
    src, dst = _extxyz(tmp_path / "big.extxyz", force=1e39), tmp_path / "big.lmdb"
    line = refused("data", "convert", src, dst)
    assert line.startswith(f"error: file {src}, sample 1, field 'forces': 1 value(s) are NaN or infinite in float32"), line
    assert not dst.exists() and list(tmp_path.iterdir()) == [src]  # no temporary left either


def test_convert_keeps_an_existing_destination_unless_overwrite(tmp_path):
    src, dst = _extxyz(tmp_path / "ok.extxyz"), tmp_path / "out.lmdb"
    dst.write_text("precious")
    assert refused("data", "convert", src, dst) == f"error: file {dst}: destination exists; pass --overwrite to replace it"
    assert dst.read_text() == "precious"
    code, out, _ = kdcache("data", "convert", src, dst, "--overwrite")
    assert code == 0 and f"wrote 3 samples to {dst}" in out, out
    code, out, _ = kdcache("data", "convert", src, dst)  # a valid dataset is kept too
    assert code == 1 and "destination exists" in out


# --- recipes ------------------------------------------------------------------------------------------
def _recipe(tmp_path, extra: str = "", out=None):
    for split in ("train", "val", "test"):
        (tmp_path / f"{split}.lmdb").write_bytes(b"")
    f = tmp_path / "r.yaml"
    f.write_text(textwrap.dedent(f"""\
        data: {{train: {tmp_path}/train.lmdb, val: {tmp_path}/val.lmdb, test: {tmp_path}/test.lmdb}}
        out: {out or tmp_path / 'run'}
        teacher: {{preset: painn-tiny, train: {{max_steps: 1}}}}
        students: {{preset: painn-tiny}}
        strategies: [n2n]
    """) + extra)
    return f


@pytest.mark.parametrize("options, message", [
    ("{codec: lzma}", "key 'store.options.codec': 'lzma' is not one of none, zstd, blosc-lz4"),
    ("{shard_atoms: 0}", "key 'store.options.shard_atoms': must be positive, got 0"),
    ("{shard_atoms: 100, chunk_atoms: 64}",
     "key 'store.options.shard_atoms': shard_atoms (100) must be a multiple of chunk_atoms (64)"),
    ("{limit: -2}", "key 'store.options.limit': must be positive, got -2 (leave it out to store every sample)"),
])
def test_validate_checks_store_option_values(tmp_path, options, message):
    f = _recipe(tmp_path, f"store: {{options: {options}}}\n")
    assert refused("pipeline", "validate", f) == f"error: recipe {f}: {message}"


def test_extract_refuses_a_negative_limit(tmp_path, data):
    line = refused("extract", "--teacher", "painn-tiny", "--data", data, "--out", tmp_path / "s.zarr", "--device",
                   "cpu", "--limit", -2)
    assert line == "error: --limit: must be positive, got -2 (leave it out to store every sample)"
    assert not (tmp_path / "s.zarr").exists()


def test_an_existing_file_as_the_run_folder_is_refused(tmp_path):
    file = tmp_path / "taken"
    file.write_text("keep me")
    f = _recipe(tmp_path, out=file)
    expected = (f"error: recipe {f}: key 'out': {file}: an existing file is there, where a folder is needed; "
                "choose another path")
    assert refused("pipeline", "validate", f) == expected
    assert refused("pipeline", "run", f, "--device", "cpu") == expected
    assert refused("pipeline", "run", _recipe(tmp_path), "--out", file, "--device", "cpu") == (
        f"error: --out {file}: an existing file is there, where a folder is needed; choose another path")
    assert file.read_text() == "keep me"
