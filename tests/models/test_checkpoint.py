"""Checkpoints: Open Catalyst layout (EMA, normalisers, scale factors), kdcache round trip, errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache import keys as K
from kdcache.errors import CheckpointError
from kdcache.models.checkpoint import (
    apply_scale_file,
    file_sha256,
    load_checkpoint,
    save_checkpoint,
    scale_factor_modules,
)
from kdcache.models.presets import build_preset

from .test_painn import reference_batch

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "reference"
PAINN_CKPT = FIX / "painn" / "checkpoint.pt"


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIX / "painn" / "reference.npz"))


@pytest.fixture(scope="module")
def ocp():
    return torch.load(PAINN_CKPT, weights_only=True)


def _write(tmp_path, payload, name="ckpt.pt") -> Path:
    path = tmp_path / name
    torch.save(payload, path)
    return path


def test_ocp_checkpoint_metadata_ema_and_normalizer(ocp):
    loaded = load_checkpoint(PAINN_CKPT)
    assert loaded.source_format == "ocp" and loaded.name == "painn"
    assert loaded.sha256 == hashlib.sha256(PAINN_CKPT.read_bytes()).hexdigest() == file_sha256(PAINN_CKPT)
    assert loaded.config["hidden_channels"] == 32 and loaded.config["max_neighbors"] == 30
    assert not loaded.model.training
    # the EMA shadow weights, in model.parameters() order (requires_grad only), were applied
    trainable = [p for p in loaded.model.parameters() if p.requires_grad]
    assert len(trainable) == len(ocp["ema"]["shadow_params"])
    for p, s in zip(trainable, ocp["ema"]["shadow_params"]):
        assert torch.equal(p, s)
    assert not torch.equal(trainable[0], ocp["state_dict"]["module.atom_emb.embeddings.weight"])
    # scale factors (not trainable, not in the EMA) come from the state dict
    assert float(loaded.model.upd_out_scalar_scale_1.scale_factor) == float(
        ocp["state_dict"]["module.upd_out_scalar_scale_1.scale_factor"]
    )
    norm = loaded.model.normalizer.as_dict()
    assert norm["energy_mean"] == pytest.approx(float(ocp["normalizers"]["target"]["mean"]))
    assert norm["energy_std"] == pytest.approx(float(ocp["normalizers"]["target"]["std"]))
    assert norm["forces_std"] == pytest.approx(float(ocp["normalizers"]["grad_target"]["std"]))


def test_dtype_argument(ocp):
    assert load_checkpoint(PAINN_CKPT, dtype=torch.float32).model.atom_emb.embeddings.weight.dtype == torch.float32
    assert load_checkpoint(PAINN_CKPT, dtype=torch.float64).model.atom_emb.embeddings.weight.dtype == torch.float64


def test_kdcache_round_trip_rebuilds_from_file_alone(tmp_path):
    torch.manual_seed(1)
    model = build_preset("painn-tiny", max_neighbors=12).double()
    model.upd_out_scalar_scale_0.set_(0.7)
    from kdcache.models.base import Normalizer

    model.normalizer = Normalizer(-1.5, 2.5, 3.0)
    path = save_checkpoint(tmp_path / "sub" / "m.pt", model, extra={"epoch": 3, "note": "x"})
    assert [p.name for p in path.parent.iterdir()] == ["m.pt"]  # no temporary file left behind
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "kdcache" and raw["model"] == "painn" and raw["config"]["max_neighbors"] == 12

    loaded = load_checkpoint(path)
    assert loaded.source_format == "kdcache" and loaded.extra == {"epoch": 3, "note": "x"}
    assert loaded.config == model.config and loaded.sha256 == file_sha256(path)
    assert loaded.model.normalizer.as_dict() == model.normalizer.as_dict()
    batch = reference_batch(dict(np.load(FIX / "painn" / "reference.npz")))
    a = model.eval().predict(batch, features=(K.NODE, K.VECTOR))
    b = loaded.model.predict(batch, features=(K.NODE, K.VECTOR))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.parametrize(
    "preset",
    ["schnet-tiny", "painn-tiny", "gemnet-oc-tiny"],
)
def test_round_trip_state_and_config(tmp_path, preset):
    torch.manual_seed(2)
    model = build_preset(preset)
    loaded = load_checkpoint(save_checkpoint(tmp_path / "m.pt", model))
    assert loaded.name == model.name and type(loaded.model) is type(model) and loaded.config == model.config
    a, b = model.state_dict(), loaded.model.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert next(loaded.model.parameters()).dtype == torch.float32  # stored precision kept


# --- errors ----------------------------------------------------------------------------------


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="top level"):
        load_checkpoint(_write(tmp_path, [1, 2, 3]))
    with pytest.raises(CheckpointError, match="neither"):
        load_checkpoint(_write(tmp_path, {"weights": {}}))


class _Evil:
    def __reduce__(self):  # would run code if unpickled without weights_only
        return (print, ("pwned",))


def test_code_in_a_checkpoint_is_refused(tmp_path, capsys):
    path = _write(tmp_path, {"format": "kdcache", "model": "painn", "config": {}, "state_dict": {}, "x": _Evil()})
    with pytest.raises(CheckpointError, match="weights-only"):
        load_checkpoint(path)
    assert "pwned" not in capsys.readouterr().out


def test_unknown_model(tmp_path, ocp):
    bad = dict(ocp, config=dict(ocp["config"], model="dimenet"))
    with pytest.raises(CheckpointError, match="unknown model 'dimenet'"):
        load_checkpoint(_write(tmp_path, bad))


def test_bad_model_attributes(tmp_path, ocp):
    cfg = dict(ocp["config"], model_attributes=dict(ocp["config"]["model_attributes"], wings=2))
    with pytest.raises(CheckpointError, match="does not fit model"):
        load_checkpoint(_write(tmp_path, dict(ocp, config=cfg)))


def test_missing_unexpected_and_mismatched_keys_are_listed(tmp_path, ocp):
    sd = dict(ocp["state_dict"])
    del sd["module.out_energy.2.bias"]
    sd["module.extra.weight"] = torch.zeros(2)
    sd["module.message_layers.0.rbf_proj.weight"] = torch.zeros(96, 15, dtype=torch.float64)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_write(tmp_path, dict(ocp, state_dict=sd)))
    msg = str(err.value)
    assert "out_energy.2.bias" in msg and "extra.weight" in msg
    assert "message_layers.0.rbf_proj.weight: checkpoint (96, 15) vs model (96, 16)" in msg
    assert str(tmp_path) in msg


def test_ema_that_does_not_fit(tmp_path, ocp):
    ema = dict(ocp["ema"], shadow_params=ocp["ema"]["shadow_params"][:-1])
    with pytest.raises(CheckpointError, match="55 shadow parameters, model has 56"):
        load_checkpoint(_write(tmp_path, dict(ocp, ema=ema)))


def test_checkpoint_without_ema_uses_trained_weights(tmp_path, ocp):
    loaded = load_checkpoint(_write(tmp_path, dict(ocp, ema=None)))
    assert not loaded.used_ema
    assert torch.equal(loaded.model.atom_emb.embeddings.weight, ocp["state_dict"]["module.atom_emb.embeddings.weight"])


# --- scale factors ---------------------------------------------------------------------------


def _without_scales(ocp):
    sd = {k: v for k, v in ocp["state_dict"].items() if not k.endswith("scale_factor")}
    scales = {k[len("module."):-len(".scale_factor")]: float(v) for k, v in ocp["state_dict"].items() if k.endswith("scale_factor")}
    return dict(ocp, state_dict=sd), scales


def test_scale_factors_from_a_separate_file(tmp_path, ocp, ref):
    ckpt, scales = _without_scales(ocp)
    assert sorted(scales) == ["upd_out_scalar_scale_0", "upd_out_scalar_scale_1", "upd_out_scalar_scale_2"]
    path = _write(tmp_path, ckpt)
    with pytest.raises(CheckpointError, match="scale_file"):
        load_checkpoint(path)
    js = tmp_path / "scales.json"
    js.write_text(json.dumps({"comment": "painn", **scales}))
    pt = tmp_path / "scales.pt"
    torch.save({k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64), requires_grad=False) for k, v in scales.items()}, pt)
    batch = reference_batch(ref)
    for scale_file in (js, pt, scales):
        model = load_checkpoint(path, dtype=torch.float64, scale_file=scale_file).model
        energy = model(batch)[K.ENERGY].detach().numpy()
        np.testing.assert_allclose(energy, ref[K.ENERGY], rtol=1e-8)


def test_scale_dict_inside_the_checkpoint(tmp_path, ocp, ref):
    ckpt, scales = _without_scales(ocp)
    model = load_checkpoint(_write(tmp_path, dict(ckpt, scale_dict=scales)), dtype=torch.float64).model
    np.testing.assert_allclose(model(reference_batch(ref))[K.ENERGY].detach().numpy(), ref[K.ENERGY], rtol=1e-8)


def test_incomplete_or_bad_scale_files(tmp_path):
    model = build_preset("painn-tiny")
    assert sorted(scale_factor_modules(model)) == [f"upd_out_scalar_scale_{i}" for i in range(3)]
    with pytest.raises(CheckpointError, match="upd_out_scalar_scale_2"):
        apply_scale_file(model, {"upd_out_scalar_scale_0": 1.0, "upd_out_scalar_scale_1": 1.0})
    with pytest.raises(CheckpointError, match="unsupported extension"):
        p = tmp_path / "s.yaml"
        p.write_text("a: 1")
        apply_scale_file(model, p)
    names = apply_scale_file(model, {f"upd_out_scalar_scale_{i}": 0.5 + i for i in range(3)} | {"old_layer": 3.0})
    assert len(names) == 3 and float(model.upd_out_scalar_scale_2.scale_factor) == 2.5
