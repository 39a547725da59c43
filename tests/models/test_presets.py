"""Presets: the paper's parameter counts (meta device, no allocation) and that every preset builds."""

from __future__ import annotations

import pytest
import torch

from kdcache.models.presets import PRESETS, build_preset, count_parameters, preset_config


@pytest.mark.parametrize(
    "name, millions",
    [
        ("gemnet-oc", 38.9),
        ("painn-big", 20.1),
        ("painn-small", 3.7),
        ("schnet", 9.1),
    ],
)
def test_oc20_parameter_counts_match_the_paper(name, millions):
    assert round(count_parameters(name) / 1e6, 1) == millions


def test_paper_settings():
    big, small = preset_config("painn-big")[1], preset_config("painn-small")[1]
    assert (big["hidden_channels"], big["num_layers"], big["num_rbf"], big["cutoff"], big["max_neighbors"]) == (512, 6, 128, 12.0, 50)
    assert (small["hidden_channels"], small["num_layers"]) == (256, 4)
    s = preset_config("schnet")[1]
    assert (s["hidden_channels"], s["num_filters"], s["num_interactions"], s["num_gaussians"], s["cutoff"]) == (1024, 256, 5, 200, 6.0)
    sc = preset_config("schnet-coll")[1]
    assert (sc["hidden_channels"], sc["num_filters"], sc["num_interactions"], sc["num_gaussians"], sc["cutoff"]) == (128, 128, 6, 50, 12.0)
    g = preset_config("gemnet-oc")[1]
    assert (g["num_blocks"], g["emb_size_atom"], g["emb_size_edge"], g["cutoff"]) == (4, 256, 512, 12.0)
    assert (g["max_neighbors"], g["max_neighbors_qint"], g["max_neighbors_aeaint"], g["max_neighbors_aint"]) == (30, 8, 20, 1000)
    gc = preset_config("gemnet-oc-coll")[1]
    assert (gc["emb_size_atom"], gc["emb_size_edge"]) == (128, 256)
    assert [preset_config(n)[1]["hidden_channels"] for n in ("painn-coll-big", "painn-coll-small")] == [256, 128]
    assert [preset_config(n)[1]["num_layers"] for n in ("painn-coll-big", "painn-coll-small")] == [6, 4]


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_on_meta(name):
    model_name, config = PRESETS[name]
    with torch.device("meta"):
        model = build_preset(name)
    assert model.name == model_name
    for key, value in config.items():
        if key in model.config:
            assert model.config[key] == value, key


def test_overrides_and_copies():
    model = build_preset("painn-tiny", hidden_channels=8, direct_forces=False)
    assert model.config["hidden_channels"] == 8 and not hasattr(model, "out_forces")
    cfg = preset_config("painn-tiny")[1]
    cfg["rbf"]["name"] = "changed"
    assert PRESETS["painn-tiny"][1]["rbf"]["name"] == "gaussian"  # callers get copies
    with pytest.raises(ValueError, match="unknown preset"):
        build_preset("painn-huge")


def test_tiny_presets_are_small():
    for name in ("painn-tiny", "schnet-tiny", "gemnet-oc-tiny"):
        assert count_parameters(name) < 300_000
