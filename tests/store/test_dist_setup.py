"""Under torchrun with NCCL, extraction selects cuda:LOCAL_RANK before its first collective (the
set-up code shared with training, kdcache.distributed)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from kdcache import distributed as D
from kdcache.store.extract import extract
from kdcache.train import distributed as train_distributed


class _Stop(Exception):
    pass


@pytest.fixture
def fake_node(monkeypatch):
    """Rank 6 of 8, local rank 2 on a node with 4 GPUs; records CUDA/process-group calls."""
    calls = []
    for k, v in {"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # extract sets it on CUDA; restored after
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)

    def init(backend, **kw):
        calls.append(("init_process_group", backend))
        raise _Stop  # the test ends at the first collective set-up

    monkeypatch.setattr(dist, "init_process_group", init)
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield calls
    torch.use_deterministic_algorithms(deterministic)


@pytest.mark.parametrize("device", [None, "cuda"])
def test_extract_selects_local_rank_gpu_before_init(fake_node, tmp_path, device):
    with pytest.raises(_Stop):
        extract(tmp_path / "data.lmdb", tmp_path / "s.zarr", teacher="painn-tiny", device=device, progress=False)
    assert fake_node == [("set_device", torch.device("cuda", 2)), ("init_process_group", "nccl")]
    assert not (tmp_path / "s.zarr").exists()


def test_one_home_for_the_set_up():
    # training keeps importing kdcache.train.distributed; it is the same code, not a copy
    assert train_distributed.setup is D.setup and train_distributed.pick_device is D.pick_device


def test_pick_device_wraps_local_rank_over_visible_gpus(fake_node, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert D.pick_device(None) == torch.device("cuda", 1)
    assert D.pick_device("cuda") == torch.device("cuda", 1)
    assert D.pick_device("cuda:3") == torch.device("cuda", 3)
    assert D.pick_device("cpu") == torch.device("cpu")
