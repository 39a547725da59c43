"""Shared helpers of the data-layer tests: tiny OC20-style records and COLL text."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def make_record(n: int = 4, seed: int = 0, **override) -> dict:
    """An OC20-style record (field names as the Open Catalyst preprocessing writes them)."""
    g = torch.Generator().manual_seed(seed)
    rec = {
        "pos": torch.rand(n, 3, generator=g) * 5.0,
        "atomic_numbers": torch.tensor([29.0] * (n - 1) + [8.0]),
        "cell": (torch.eye(3) * 6.0).view(1, 3, 3),
        "natoms": n,
        "tags": torch.tensor([0] * (n // 2) + [1] * (n - n // 2 - 1) + [2]),
        "fixed": torch.tensor([1.0] * (n // 2) + [0.0] * (n - n // 2)),
        "sid": 1000 + seed,
        "fid": seed % 3,
        "y": -1.25 * (seed + 1),
        "force": torch.randn(n, 3, generator=g),
    }
    rec.update(override)
    return {k: v for k, v in rec.items() if v is not None}


COLL_TEXT = """3
Properties=species:S:1:pos:R:3:forces:R:3 energy=-2079.8601 atomization_energy=-9.3101 pbc="F F F"
O        0.00000000       0.00000000       0.11926200       0.10000000       0.20000000       0.30000000
H        0.00000000       0.76323900      -0.47704700       0.00000000      -0.05000000      -0.15000000
H        0.00000000      -0.76323900      -0.47704700       0.00000000       0.05000000      -0.15000000
2
Properties=species:S:1:pos:R:3:forces:R:3 energy=-4133.5 atomization_energy=-4.2 pbc="F F F"
C        0.00000000       0.00000000       0.00000000       1.00000000       0.00000000       0.00000000
O        0.00000000       0.00000000       1.13000000      -1.00000000       0.00000000       0.00000000
"""


@pytest.fixture
def coll_file(tmp_path):
    path = tmp_path / "coll_small.xyz"
    path.write_text(COLL_TEXT)
    return path


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    from kdcache.data.demo import write_demo

    out = tmp_path_factory.mktemp("demo")
    write_demo(out, num_train=24, num_val=6, num_test=6, seed=3, workers=1)
    return out


def np_equal(a, b) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))
