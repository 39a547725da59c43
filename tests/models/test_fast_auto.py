"""`fast: auto` (kdcache.models.fast_auto): the compiled path where the run's eager time, at the
architecture's measured speed-up, saves more than its measured cold compile; eager elsewhere,
and an explicit setting obeyed. Also the settings type (true, false, auto) and the trainer's use
of it: the chosen value is recorded, and the timing changes nothing about the run."""

import time

import pytest
import torch
from torch import nn

from kdcache.errors import ConfigError
from kdcache.models import fast_auto as A
from kdcache.models.presets import build_preset
from kdcache.settings import command_line_options
from kdcache.store.request import ExtractRequest
from kdcache.train.config import TrainConfig

CPU = torch.device("cpu")


def _never() -> float:
    raise AssertionError("timed although the decision needed no timing")


@pytest.fixture(scope="module")
def painn():
    return build_preset("painn-tiny")


def test_explicit_settings_are_obeyed_untimed(painn):
    for setting in (True, False):
        d = A.decide_fast(setting, painn, "training", 10**6, CPU, _never)
        assert d.fast is setting and not d.quiet


def test_the_measured_payoff_decides(painn):
    payoff = painn.fast_payoff["training"]
    assert payoff == A.STUDENT_PAYOFF["training"]
    batches = 100
    # saved = batches * t * (1 - 1/speedup); the compiled path exactly when that beats the compile
    edge = payoff.compile_seconds / (batches * (1 - 1 / payoff.speedup))
    on = A.decide_fast("auto", painn, "training", batches, CPU, lambda: 1.05 * edge)
    off = A.decide_fast("auto", painn, "training", batches, CPU, lambda: 0.95 * edge)
    assert on.fast and not off.fast and not on.quiet and not off.quiet
    assert f"{batches} batches x {1e3 * edge * 1.05:.0f} ms eager" in on.reason
    assert "fast path: on (auto:" in on.describe() and "fast path: off (auto:" in off.describe()
    # far from paying: eager and silent; a close call is said
    far = A.decide_fast("auto", painn, "training", batches, CPU, lambda: 0.45 * edge)
    assert not far.fast and far.quiet
    # inference has its own, smaller speed-up: the same eager time that pays in training may not
    inf = painn.fast_payoff["inference"]
    assert inf.speedup < payoff.speedup
    assert not A.decide_fast("auto", painn, "inference", batches, CPU, lambda: 1.05 * edge).fast


def test_auto_stays_eager_untimed_where_it_cannot_pay_or_run(painn):
    short = A.decide_fast("auto", painn, "training", A.MIN_BATCHES - 1, CPU, _never)
    assert not short.fast and short.quiet
    cuda = A.decide_fast("auto", painn, "training", 10**6, torch.device("cuda"), _never)
    assert not cuda.fast and "CPU only" in cuda.reason and "--fast" in cuda.reason
    cannot = A.decide_fast("auto", painn, "training", 10**6, CPU, _never, cannot="strategy hessian differentiates")
    assert not cannot.fast and "hessian" in cannot.reason
    gemnet = build_preset("gemnet-oc-tiny")
    assert "training" not in gemnet.fast_payoff  # not measured: auto never trains GemNet-OC compiled
    unmeasured = A.decide_fast("auto", gemnet, "training", 10**6, CPU, _never)
    assert not unmeasured.fast and "no measured training speed-up for gemnet_oc" in unmeasured.reason
    assert A.decide_fast("auto", gemnet, "inference", 10**6, CPU, lambda: 1.0).fast  # 10^6 s eager pays
    foreign = A.decide_fast("auto", nn.Linear(2, 2), "inference", 10**6, CPU, _never)
    assert not foreign.fast and "no compiled path" in foreign.reason
    with pytest.raises(ValueError):
        A.decide_fast("yes", painn, "training", 10, CPU, _never)
    with pytest.raises(ValueError):
        A.decide_fast("auto", painn, "backward", 10, CPU, _never)


def test_eager_batch_seconds_times_a_quick_batch_twice_and_a_slow_one_once(monkeypatch):
    calls = []
    assert A.eager_batch_seconds(lambda: calls.append(1), CPU) < A.ONE_CALL_SECONDS and len(calls) == 2
    monkeypatch.setattr(A, "ONE_CALL_SECONDS", 0.01)
    calls.clear()
    assert A.eager_batch_seconds(lambda: calls.append(time.sleep(0.02)), CPU) >= 0.02 and len(calls) == 1


def test_the_setting_takes_true_false_and_auto_only():
    assert TrainConfig().fast == "auto" and ExtractRequest.of(data="d", out="o").fast == "auto"
    for value in (True, False, "auto"):
        assert TrainConfig.from_dict({"fast": value}).fast == value
        assert ExtractRequest.of(data="d", out="o", fast=value).fast == value
    for bad in ("yes", 1, "true", None):
        with pytest.raises(ConfigError, match="fast.*true, false or 'auto'"):
            TrainConfig.from_dict({"fast": bad})
    # a switch on the command line: --fast / --no-fast, neither is auto
    (option,) = [o for o in command_line_options(TrainConfig) if o.name == "fast"]
    assert option.type is bool and "(default: auto)" in option.help
    # auto is no request for the compiled path: what it cannot do is not refused
    ExtractRequest.of(data="d", out="o", fast="auto", hessian_probes=2)
    TrainConfig.from_dict({"fast": "auto", "strategy": "hessian"})
    with pytest.raises(ConfigError, match="hessian"):
        TrainConfig.from_dict({"fast": True, "strategy": "hessian"})


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from kdcache.data.demo import write_demo

    out = tmp_path_factory.mktemp("auto") / "demo"
    write_demo(out, num_train=16, num_val=4, num_test=2, seed=0)
    return out


def _trainer(demo, out, **settings):
    from kdcache.train.trainer import Trainer

    cfg = TrainConfig.from_dict({"student": "painn-tiny", "data": str(demo / "train.lmdb"), "out": str(out),
                                 "batch_size": 4, "progress": False, **settings})
    return Trainer(cfg)


def test_the_trainer_records_what_auto_chose_and_the_timing_changes_nothing(demo, tmp_path, monkeypatch, capsys):
    eager = _trainer(demo, tmp_path / "a", max_steps=A.MIN_BATCHES, fast=False)
    rng_eager = torch.random.get_rng_state()
    timed = _trainer(demo, tmp_path / "b", max_steps=A.MIN_BATCHES)  # weighed: one step timed twice
    rng_timed = torch.random.get_rng_state()
    assert "ms eager" in timed.fast_decision.reason and not timed.fast_decision.fast  # painn-tiny: ms per step
    assert timed.cfg.fast is False and timed.cfg.to_dict()["fast"] is False  # config.yaml records the choice
    assert "fast path" not in capsys.readouterr().err  # far from paying: eager and silent
    # the timed step drew no random numbers and left no gradients: the run is the eager one
    assert torch.equal(rng_eager, rng_timed)
    assert all(p.grad is None for p in timed.student.parameters())
    se, st = eager.objective.state_dict(), timed.objective.state_dict()
    assert se.keys() == st.keys() and all(torch.equal(se[k], st[k]) for k in se)
    # a slow machine (or a big model): the same run pays for the compile
    from kdcache.models import fast as F

    made = []
    monkeypatch.setattr(F, "fast_model", lambda m: made.append(m) or m)  # no compile in this test
    monkeypatch.setattr(A, "eager_batch_seconds", lambda run, device: 10.0)
    slow = _trainer(demo, tmp_path / "c", max_steps=A.MIN_BATCHES)
    assert slow.fast_decision.fast and slow.cfg.fast is True and made


def test_a_run_saved_before_the_setting_resumes_eagerly_untimed(demo, tmp_path, monkeypatch):
    out = tmp_path / "old"
    _trainer(demo, out, max_steps=2, fast=False).fit()
    ckpt = torch.load(out / "last.pt", weights_only=True)
    del ckpt["extra"]["trainer_state"]["config"]["fast"]  # as a run of an older kdcache wrote it
    torch.save(ckpt, out / "last.pt")
    # it ran eagerly: auto keeps that, even where a new run of the same length would compile
    monkeypatch.setattr(A, "eager_batch_seconds", lambda run, device: 1e4)
    resumed = _trainer(demo, out, max_steps=A.MIN_BATCHES)
    assert not resumed.fast_decision.fast and "kept from the run" in resumed.fast_decision.reason
    assert resumed.resume() and resumed.step == 2
