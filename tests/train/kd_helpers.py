"""Test helpers for stage two: demo data and a small feature store written with the store module.

The store's targets come from a randomly initialised tiny PaiNN "teacher" (node, vector,
atom_energy, energy, forces) and, for e2n/e2v, from invariant edge features of its graph summed
onto atoms with :func:`kdcache.features.aggregate_edge_features` — real, rotation-consistent
targets without running GemNet-OC.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kdcache import keys as K

STUDENT = "painn-tiny"
STUDENT_OVERRIDES = {"hidden_channels": 16, "num_layers": 2, "num_rbf": 8, "cutoff": 5.0, "max_neighbors": 12}
SCHNET_OVERRIDES = {"hidden_channels": 16, "num_filters": 16, "num_interactions": 2, "num_gaussians": 8, "cutoff": 5.0}


def open_ds(path):
    try:
        from kdcache.data import open_dataset
    except ImportError:
        open_dataset = None
    if open_dataset is not None:
        return open_dataset(path)
    from kdcache.data.lmdb_dataset import LmdbDataset

    return LmdbDataset(path)


def make_demo(folder: Path, num_train: int = 24, num_val: int = 6) -> dict[str, Path]:
    from kdcache.data.demo import write_demo

    return write_demo(folder, num_train=num_train, num_val=num_val, num_test=2, seed=0)


@torch.no_grad()
def teacher_targets(dataset) -> list[dict[str, torch.Tensor]]:
    """Per sample: node [n,16], vector [n,3,16], e2n [n,12], e2v [n,3,12], atom_energy [n],
    forces [n,3], energy [1] (physical units), from a fixed random tiny PaiNN."""
    from kdcache.features import aggregate_edge_features
    from kdcache.models.presets import build_preset

    gen_state = torch.get_rng_state()
    torch.manual_seed(1234)
    teacher = build_preset("painn-tiny", hidden_channels=16, num_layers=2, num_rbf=8, cutoff=5.0, max_neighbors=12)
    w_edge = torch.randn(8, 12)
    torch.set_rng_state(gen_state)
    teacher.normalizer.energy_std.fill_(2.0)
    teacher.eval()
    from torch_geometric.data import Batch

    out = []
    for i in range(len(dataset)):
        batch = Batch.from_data_list([dataset[i]])
        pred = teacher.predict(batch, features=(K.NODE, K.VECTOR))
        graph = teacher.build_graph(batch, batch[K.POSITIONS])
        edge = torch.tanh(teacher.radial_basis(graph["dist"]) @ w_edge)
        # kdcache.keys convention: edge_vector points from source s to target t
        agg = aggregate_edge_features(edge, torch.stack([graph["src"], graph["dst"]]), -graph["edge_dir"],
                                      batch[K.POSITIONS].shape[0])
        out.append({K.NODE: pred[K.NODE], K.VECTOR: pred[K.VECTOR], K.E2N: agg[K.E2N], K.E2V: agg[K.E2V],
                    K.ATOM_ENERGY: pred[K.ATOM_ENERGY], K.FORCES: pred[K.FORCES], K.ENERGY: pred[K.ENERGY]})
    return out


def write_store(path: Path, dataset, keys=(K.NODE, K.VECTOR, K.E2N, K.E2V, K.ATOM_ENERGY, K.FORCES),
                teacher_name: str = "painn", finish: bool = True, targets=None, teacher_checkpoint=None):
    """Write a store for ``dataset`` with the store module's writer (all groups, then finalize)."""
    try:
        from kdcache.data import sample_hash
    except ImportError:
        from kdcache.data.sample import sample_hash
    from kdcache.store import Layout, StoreWriter
    from kdcache.store import format as F

    targets = targets if targets is not None else teacher_targets(dataset)
    natoms = np.array([t[K.FORCES].shape[0] for t in targets])
    layout = Layout.plan(natoms, shard_atoms=256, chunk_atoms=64)
    row_shapes = {k: tuple(targets[0][k].shape[1:]) for k in keys}
    dtypes = {k: "float32" for k in (*keys, K.ENERGY)}
    fp = dataset.fingerprint() if hasattr(dataset, "fingerprint") else {}
    writer = StoreWriter.create(path, layout, np.arange(len(dataset)), row_shapes, dtypes,
                                request={"teacher": {"name": teacher_name}, "keys": list(keys), "dataset": fp},
                                provenance={"teacher": {"name": teacher_name, "checkpoint": str(teacher_checkpoint)},
                                            "has_energy": True})
    for g in range(layout.num_groups):
        lo, hi = layout.group_atoms(g)
        samples = layout.group_samples(g)
        rows = {}
        for k in keys:
            block = np.zeros((hi - lo, *row_shapes[k]), dtype=np.float32)
            for s in samples:
                a = int(layout.atom_start[s]) - lo
                block[a : a + natoms[s]] = targets[s][k].numpy()
            rows[k] = F.to_storage(torch.from_numpy(block), "float32")
        energy = np.array([float(targets[s][K.ENERGY][0]) for s in samples])
        hashes = np.array([sample_hash(dataset[s]) for s in samples], dtype=np.int64).view(np.uint64)
        writer.write_group(g, rows, energy, hashes)
        if not finish:
            break
    if finish:
        writer.finalize()
    return path
