"""LocalBatchSampler: coverage, locality, determinism and exact resume."""

from __future__ import annotations

import pytest

from kdcache.store import LocalBatchSampler


def _epoch(s):
    return [b for b in s]


def test_every_sample_once_per_epoch_and_local_batches():
    s = LocalBatchSampler(1000, batch_size=32, window=100, seed=3)
    e0 = _epoch(s)
    flat = [i for b in e0 for i in b]
    assert sorted(flat) == list(range(1000))
    assert len(e0) == len(s) == 32  # ceil(1000 / 32)
    # a batch stays within one or two windows of consecutive samples
    assert all(len({i // 100 for i in b}) <= 2 for b in e0)
    e1 = _epoch(s)  # the next epoch: a different order, again complete
    assert sorted(i for b in e1 for i in b) == list(range(1000))
    assert e1 != e0
    # deterministic: same seed and epoch -> same batches
    t = LocalBatchSampler(1000, batch_size=32, window=100, seed=3)
    assert _epoch(t) == e0
    t.set_epoch(1)
    assert _epoch(t) == e1


def test_drop_last_and_no_shuffle():
    s = LocalBatchSampler(10, batch_size=4, shuffle=False, drop_last=True)
    assert _epoch(s) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_resume_mid_epoch_exactly():
    full = LocalBatchSampler(500, batch_size=16, window=64, seed=1)
    full.set_epoch(2)
    ref = _epoch(full)
    s = LocalBatchSampler(500, batch_size=16, window=64, seed=1)
    s.set_epoch(2)
    it = iter(s)
    first = [next(it) for _ in range(7)]
    state = s.state_dict()
    assert state["epoch"] == 2 and state["batches_done"] == 7
    r = LocalBatchSampler(500, batch_size=16, window=64, seed=1)
    r.load_state_dict(state)
    r.set_epoch(2)  # a trainer calling set_epoch for the resumed epoch keeps the position
    assert first + _epoch(r) == ref
    # after the epoch the position starts over in the next epoch
    assert r.state_dict()["epoch"] == 3 and r.state_dict()["batches_done"] == 0
    with pytest.raises(ValueError):
        LocalBatchSampler(501, batch_size=16, window=64, seed=1).load_state_dict(state)


@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_split_an_epoch(drop_last):
    ranks = [LocalBatchSampler(103, batch_size=8, window=20, seed=0, rank=r, world_size=3, drop_last=drop_last) for r in range(3)]
    epochs = [_epoch(s) for s in ranks]
    assert len({len(e) for e in epochs}) == 1  # equal batch counts (DDP needs them)
    flat = [i for e in epochs for b in e for i in b]
    if drop_last:
        assert len(set(flat)) == len(flat)  # nothing twice
    else:
        assert set(flat) == set(range(103))  # everything, padded with a few repeats
        assert len(flat) - 103 < 3 * 8
        assert all(len(b) == 8 for e in epochs for b in e)
