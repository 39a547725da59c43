"""Named model configurations: the paper's teachers and students, plus tiny ones for tests/demos.

OC20 settings are the paper's (GemNet-OC = Open Catalyst's OC20 S2EF config; PaiNN-big/small;
SchNet), COLL settings the paper's smaller variants; whatever the paper does not state is taken
from the Open Catalyst OC20 S2EF configs (``configs/oc20/s2ef/all/{gemnet,painn,schnet}``).
Constructor argument names are Open Catalyst's ``model_attributes``.

Parameter counts of the OC20 presets (see ``tests/models/test_presets.py``): GemNet-OC 38.9 M,
PaiNN-big 20.1 M, PaiNN-small 3.7 M, SchNet 9.1 M.
"""

from __future__ import annotations

import copy

import torch

from kdcache.models.base import PotentialModel
from kdcache.models.registry import build_model

# --- OC20 ------------------------------------------------------------------------------------

#: GemNet-OC as in Open Catalyst's OC20 S2EF config (gemnet-oc.yml), without its scale file
#: (scale factors come with a checkpoint, or are fitted).
GEMNET_OC_OC20: dict = dict(
    num_spherical=7,
    num_radial=128,
    num_blocks=4,
    emb_size_atom=256,
    emb_size_edge=512,
    emb_size_trip_in=64,
    emb_size_trip_out=64,
    emb_size_quad_in=32,
    emb_size_quad_out=32,
    emb_size_aint_in=64,
    emb_size_aint_out=64,
    emb_size_rbf=16,
    emb_size_cbf=16,
    emb_size_sbf=32,
    num_before_skip=2,
    num_after_skip=2,
    num_concat=1,
    num_atom=3,
    num_output_afteratom=3,
    num_atom_emb_layers=2,
    num_global_out_layers=2,
    regress_forces=True,
    direct_forces=True,
    use_pbc=True,
    cutoff=12.0,
    cutoff_qint=12.0,
    cutoff_aeaint=12.0,
    cutoff_aint=12.0,
    max_neighbors=30,
    max_neighbors_qint=8,
    max_neighbors_aeaint=20,
    max_neighbors_aint=1000,
    rbf={"name": "gaussian"},
    envelope={"name": "polynomial", "exponent": 5},
    cbf={"name": "spherical_harmonics"},
    sbf={"name": "legendre_outer"},
    extensive=True,
    output_init="HeOrthogonal",
    activation="silu",
    quad_interaction=True,
    atom_edge_interaction=True,
    edge_atom_interaction=True,
    atom_interaction=True,
    qint_tags=[1, 2],
    num_elements=83,
    otf_graph=True,
)

#: PaiNN of Open Catalyst's OC20 S2EF config (painn_h512.yml) = the paper's PaiNN-big.
PAINN_OC20: dict = dict(
    hidden_channels=512,
    num_layers=6,
    num_rbf=128,
    cutoff=12.0,
    max_neighbors=50,
    rbf={"name": "gaussian"},
    envelope={"name": "polynomial", "exponent": 5},
    regress_forces=True,
    direct_forces=True,
    use_pbc=True,
    otf_graph=True,
    num_elements=83,
)

#: SchNet of Open Catalyst's OC20 S2EF config (schnet.yml).
SCHNET_OC20: dict = dict(
    use_pbc=True,
    regress_forces=True,
    otf_graph=True,
    hidden_channels=1024,
    num_filters=256,
    num_interactions=5,
    num_gaussians=200,
    cutoff=6.0,
    readout="sum",
)


def _with(base: dict, **changes) -> dict:
    out = copy.deepcopy(base)
    out.update(changes)
    return out


#: name -> (registry name, constructor arguments)
PRESETS: dict[str, tuple[str, dict]] = {
    # OC20 (paper)
    "gemnet-oc": ("gemnet_oc", _with(GEMNET_OC_OC20)),
    "painn-big": ("painn", _with(PAINN_OC20)),
    "painn-small": ("painn", _with(PAINN_OC20, hidden_channels=256, num_layers=4)),
    "schnet": ("schnet", _with(SCHNET_OC20)),
    # COLL (paper): smaller widths; SchNet with COLL's longer cutoff. GemNet-OC: every tag takes
    # part in quadruplets. COLL molecules carry tag 0 (no slab/adsorbate split, ASE's default), so
    # OC20's qint_tags [1, 2] would leave the quadruplet interaction without a single quadruplet
    # (its output is then exactly zero: a GemNet-OC without quadruplets, not the paper's teacher).
    "gemnet-oc-coll": (
        "gemnet_oc", _with(GEMNET_OC_OC20, emb_size_atom=128, emb_size_edge=256, qint_tags=[0, 1, 2])
    ),
    "painn-coll-big": ("painn", _with(PAINN_OC20, hidden_channels=256, num_layers=6)),
    "painn-coll-small": ("painn", _with(PAINN_OC20, hidden_channels=128, num_layers=4)),
    "schnet-coll": (
        "schnet",
        _with(SCHNET_OC20, hidden_channels=128, num_filters=128, num_interactions=6, num_gaussians=50, cutoff=12.0),
    ),
    # tiny: fast on a CPU (tests, demo); the architectures of the reference fixtures
    "gemnet-oc-tiny": (
        "gemnet_oc",
        _with(
            GEMNET_OC_OC20,
            num_radial=16,
            num_blocks=2,
            emb_size_atom=32,
            emb_size_edge=48,
            emb_size_trip_in=16,
            emb_size_trip_out=16,
            emb_size_quad_in=8,
            emb_size_quad_out=8,
            emb_size_aint_in=16,
            emb_size_aint_out=16,
            emb_size_rbf=8,
            emb_size_cbf=8,
            emb_size_sbf=16,
            num_before_skip=1,
            num_after_skip=1,
            num_atom=2,
            num_output_afteratom=2,
            num_atom_emb_layers=1,
            num_global_out_layers=1,
            cutoff=6.0,
            cutoff_qint=6.0,
            cutoff_aeaint=6.0,
            cutoff_aint=6.0,
        ),
    ),
    "painn-tiny": ("painn", _with(PAINN_OC20, hidden_channels=32, num_layers=3, num_rbf=16, cutoff=6.0, max_neighbors=30)),
    "schnet-tiny": (
        "schnet",
        _with(SCHNET_OC20, hidden_channels=32, num_filters=24, num_interactions=3, num_gaussians=20, cutoff=6.0),
    ),
}


def preset_config(name: str) -> tuple[str, dict]:
    """``(registry name, a copy of the constructor arguments)`` of a preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    model_name, config = PRESETS[name]
    return model_name, copy.deepcopy(config)


def build_preset(name: str, **overrides) -> PotentialModel:
    """Build a preset model, with constructor arguments overridden by ``overrides``."""
    model_name, config = preset_config(name)
    config.update(overrides)
    return build_model(model_name, **config)


def count_parameters(name: str, **overrides) -> int:
    """Parameters of a preset (all, as Open Catalyst's ``num_params``), counted on the meta
    device so that no weights are allocated."""
    with torch.device("meta"):
        model = build_preset(name, **overrides)
    return sum(p.numel() for p in model.parameters())


__all__ = ["PRESETS", "build_preset", "count_parameters", "preset_config"]
