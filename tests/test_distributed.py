"""kdcache.distributed.rank0_result: rank 0's result on every rank, through one collective; a
failure on rank 0 stops every rank, named, instead of leaving them waiting (two gloo processes)."""

import os
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from kdcache import distributed as D
from kdcache.errors import KDCacheError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, fail: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    calls = []

    def work():
        calls.append(rank)
        if fail:
            raise ValueError("timing ran out of memory")
        return {"fast": True, "by": rank}

    try:
        got = D.rank0_result(work, "decide the fast path")
        text = f"ok {got['by']} {got['fast']} calls={calls}"
    except KDCacheError as exc:
        text = f"kdcache {exc}"
    except ValueError as exc:
        text = f"own {exc}"
    with open(f"{out}.{rank}", "w") as f:
        f.write(text)
    dist.destroy_process_group()


@pytest.mark.parametrize("fail", [False, True])
def test_rank0_result_on_two_ranks(tmp_path, fail):
    out = str(tmp_path / "rank")
    mp.spawn(_worker, args=(_free_port(), fail, out), nprocs=2, join=True)
    texts = [open(f"{out}.{r}").read() for r in (0, 1)]
    if not fail:  # computed on rank 0 only, the same answer on both
        assert texts == ["ok 0 True calls=[0]", "ok 0 True calls=[]"]
    else:  # rank 0 raises its own error, rank 1 a named one: nobody waits
        assert texts == ["own timing ran out of memory",
                         "kdcache rank 0 could not decide the fast path: ValueError: timing ran out of memory"]


def test_rank0_result_in_one_process_is_the_call():
    assert D.rank0_result(lambda: 42, "x") == 42
