"""Damage is detected, never trained on: `kdcache store verify` and `kdcache train` on stores whose
shard bytes were flipped, whose shard was deleted or cut off, whose per-sample arrays were changed
(uncompressed and zstd stores), and on stores written before checksums (format 1)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import zarr
from typer.testing import CliRunner

from kdcache.cli.main import app
from kdcache import keys as K
from kdcache.store import FeatureStore
from kdcache.store.extract import extract

from .conftest import PAINN_ARGS

runner = CliRunner()


def as_format_1(path: Path) -> None:
    """Make a store look like one written before checksums: format 1, no checksums, no identity."""
    root = zarr.open_group(str(path), mode="r+")
    attrs = {k: v for k, v in root.attrs["kdcache"].items() if k not in ("checksums", "identity")}
    root.attrs["kdcache"] = {**attrs, "format_version": 1}


def _copy(store: Path, tmp_path: Path) -> Path:
    out = tmp_path / "teacher.zarr"
    shutil.copytree(store, out)
    return out


def _file(store: Path, key: str, i: int) -> Path:
    return FeatureStore(store, load_samples=False).data_file(key, i)


def _flip(file: Path, offset: int) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 0xFF
    file.write_bytes(bytes(data))


def _cut(file: Path, nbytes: int) -> None:
    data = file.read_bytes()
    file.write_bytes(data[:-nbytes])


def _verify(store: Path, *extra: str):
    return runner.invoke(app, ["store", "verify", str(store), *extra])


def _train(store: Path, data: Path, out: Path):
    # one step over all 14 molecules: every shard is read
    return runner.invoke(app, ["train", "--student", "painn-tiny", "--data", str(data), "--store", str(store),
                               "--strategy", "n2n", "--max-steps", "1", "--batch-size", "14", "--device", "cpu",
                               "--no-progress", "--out", str(out)])


def _refused(res, *words: str) -> str:
    """A one-line `error:` naming ``words``, exit code 1, no traceback; returns the line."""
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit), res.exception  # not an uncaught error
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.output, res.output
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


def test_intact_store_verifies_and_records_identity(painn_ref_store, mol_lmdb):
    res = _verify(painn_ref_store, "--data", str(mol_lmdb))
    assert res.exit_code == 0 and res.output.strip().endswith("OK"), res.output
    store = FeatureStore.open(painn_ref_store)
    assert store.checksummed and store.format_version == 2
    assert "every byte checked against its checksum" in res.output and f"identity   {store.identity} matches" in res.output
    # every data file is recorded: 5 per-sample arrays of one chunk, one record per shard of each per-atom array
    records = store.provenance["checksums"]["files"]
    assert {k: len(v) for k, v in records.items()} == {
        **{k: 1 for k in ("sample_index", "natoms", "atom_start", "energy", "sample_hash")},
        **{k: store.num_files(k) for k in store.per_atom_keys}}
    assert store.num_files(K.NODE) == store.provenance["layout"]["atom_axis"] // 16 > 2


def test_flipped_shard_bytes_fail_verify_and_training(painn_ref_store, mol_lmdb, tmp_path):
    store = _copy(painn_ref_store, tmp_path)
    shard = _file(store, K.NODE, 1)
    _flip(shard, 5)  # inside the data region (the index is at the end)
    res = _verify(store)
    assert res.exit_code == 1 and res.output.strip().endswith("FAILED")
    damaged = [line for line in res.output.splitlines() if line.startswith("DAMAGED")]
    assert len(damaged) == 1 and "array 'node', shard file node/c/1/0" in damaged[0] and "checksum" in damaged[0]
    # --quick checks presence, sizes and shard indexes only: a flipped data byte goes unnoticed
    assert _verify(store, "--quick").exit_code == 0
    line = _refused(_train(store, mol_lmdb, tmp_path / "run"), str(store), "array 'node'", "shard file node/c/1/0",
                    "checksum")
    assert "the store is damaged" in line
    assert not (tmp_path / "run" / "last.pt").exists()  # no step was taken on it


def test_deleted_shard_fails_verify_and_training(painn_ref_store, mol_lmdb, tmp_path):
    store = _copy(painn_ref_store, tmp_path)
    _file(store, K.NODE, 2).unlink()
    for extra in ((), ("--quick",)):
        res = _verify(store, *extra)
        assert res.exit_code == 1 and "DAMAGED    " + f"{store}: array 'node', shard file node/c/2/0: the file is missing" in res.output
    _refused(_train(store, mol_lmdb, tmp_path / "run"), "array 'node'", "shard file node/c/2/0", "missing")


def test_cut_shard_index_fails_verify_and_training(painn_ref_store, mol_lmdb, tmp_path):
    store = _copy(painn_ref_store, tmp_path)
    _cut(_file(store, K.NODE, 0), 6)  # part of the CRC32C and of the last index entry
    res = _verify(store, "--quick")
    assert res.exit_code == 1 and "array 'node', shard file node/c/0/0: the file has" in res.output
    _refused(_train(store, mol_lmdb, tmp_path / "run"), "array 'node'", "shard file node/c/0/0", "bytes")


def test_changed_energy_fails_verify_and_training(painn_ref_store, mol_lmdb, tmp_path):
    store = _copy(painn_ref_store, tmp_path)
    _flip(_file(store, K.ENERGY, 0), 3)  # float32 energy of sample 0, third byte
    res = _verify(store, "--quick", "--data", str(mol_lmdb))  # per-sample arrays are hashed even with --quick
    assert res.exit_code == 1 and "array 'energy', chunk file energy/c/0: its xxh3_64 checksum" in res.output
    assert "samples    " not in res.output  # the per-sample values are not trusted for the dataset check
    _refused(_train(store, mol_lmdb, tmp_path / "run"), "array 'energy'", "chunk file energy/c/0")


def test_changed_metadata_changes_the_identity(painn_ref_store, tmp_path):
    store = _copy(painn_ref_store, tmp_path)
    root = zarr.open_group(str(store), mode="r+")
    attrs = root.attrs["kdcache"]
    root.attrs["kdcache"] = {**attrs, "teacher": {**attrs["teacher"], "name": "gemnet_oc"}}
    res = _verify(store)
    assert res.exit_code == 1 and "DIFFERS: the store's metadata changed" in res.output


@pytest.fixture(scope="session")
def zstd_store(tmp_path_factory, mol_lmdb, painn_ckpt) -> Path:
    out = tmp_path_factory.mktemp("zstd") / "teacher.zarr"
    extract(mol_lmdb, out, checkpoint=str(painn_ckpt), progress=False, codec="zstd", **PAINN_ARGS)
    return out


def test_compressed_store_damage_is_caught(zstd_store, mol_lmdb, tmp_path):
    assert _verify(zstd_store).exit_code == 0
    store = _copy(zstd_store, tmp_path)
    _flip(_file(store, K.NODE, 1), 20)  # inside a compressed chunk
    res = _verify(store)
    assert res.exit_code == 1 and "array 'node', shard file node/c/1/0: its xxh3_64 checksum" in res.output
    _refused(_train(store, mol_lmdb, tmp_path / "run"), "array 'node'", "shard file node/c/1/0", "checksum")


@pytest.mark.filterwarnings("ignore:.*records no checksums:UserWarning")
def test_format_1_store_reads_unverified_but_missing_and_cut_shards_are_refused(painn_ref_store, tmp_path):
    store = _copy(painn_ref_store, tmp_path)
    as_format_1(store)
    res = _verify(store)
    assert res.exit_code == 0 and "contents UNVERIFIED" in res.output and "WARNING: this store predates" in res.output
    with pytest.warns(UserWarning, match="records no checksums"):
        fs = FeatureStore.open(store)
    assert fs.identity is None and fs.read([0])[K.NODE].shape[0] == int(fs.natoms[0])
    # without checksums, kdcache still knows every shard file exists and checks shard indexes
    _cut(_file(store, K.NODE, 0), 2)
    _file(store, K.NODE, 3).unlink()
    res = _verify(store)
    assert res.exit_code == 1
    assert "node/c/0/0: its shard index fails its CRC32C" in res.output and "node/c/3/0: the file is missing" in res.output
