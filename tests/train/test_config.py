"""Run configuration: YAML + command-line overrides, refusals, resumable differences; schedules."""

from __future__ import annotations

import pytest
import torch
import yaml

from kdcache.errors import ConfigError
from kdcache.train.config import TrainConfig
from kdcache.train.ema import EMA
from kdcache.train.schedule import LRSchedule


def test_yaml_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"student": "painn-big", "strategy": ["n2n:100", {"v2v": 10}], "lambda": 5,
                                    "batch-size": 16, "lr": 1e-3}))
    cfg = TrainConfig.load(path, {"lr": 2e-3, "max_steps": 7, "seed": None})
    assert (cfg.student, cfg.batch_size, cfg.lr, cfg.max_steps, cfg.lambda_) == ("painn-big", 16, 2e-3, 7, 5)
    assert cfg.to_dict()["strategy"] == "n2n:100,v2v:10"
    assert TrainConfig.load(None, {"strategy": "v2v", "lambda_": 3.0}).to_dict()["strategy"] == "v2v:3"
    saved = tmp_path / "saved.yaml"
    cfg.save(saved)
    again = TrainConfig.load(saved)
    assert again.to_dict() == cfg.to_dict()
    assert again.differences(cfg.to_dict()) == []
    assert TrainConfig.load(saved, {"max_steps": 99}).differences(cfg.to_dict()) == []  # may change on resume
    assert TrainConfig.load(saved, {"lr": 1.0}).differences(cfg.to_dict()) == ["lr"]


@pytest.mark.parametrize("values, match", [
    ({"learning_rate": 1}, "unknown setting"),
    ({"feature_loss": "l4"}, "feature_loss"),
    ({"student_map": "conv"}, "student_map"),
    ({"scheduler": "cosine"}, "scheduler"),
    ({"strategy": "v3v"}, "unknown strategy"),
])
def test_bad_settings(values, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(values)


def test_schedules():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    s = LRSchedule(opt, "warmup_step", lr=1.0, warmup_steps=4, warmup_factor=0.2, milestones=[6, 8], gamma=0.1)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        s.step()
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lrs[5:] == pytest.approx([1.0, 0.1, 0.1, 0.01, 0.01])
    e = LRSchedule(opt, "warmup_exp", lr=1.0, warmup_steps=0, decay_steps=10, decay_rate=0.5)
    for _ in range(10):
        e.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    pl = LRSchedule(opt, "plateau", lr=1.0, patience=1, factor=0.5)
    for loss in (1.0, 2.0, 2.0, 0.5):
        pl.on_validation(loss)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    state = pl.state_dict()
    pl2 = LRSchedule(opt, "plateau", lr=1.0, patience=1, factor=0.5)
    pl2.load_state_dict(state)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)


def test_ema_average_and_swap():
    lin = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(lin.weight)
    ema = EMA(lin, decay=0.5)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema.update()  # decay min(0.5, 2/11) = 2/11: shadow = 9/11
    assert ema.shadow[0].item() == pytest.approx(9 / 11)
    with ema.average_parameters():
        assert lin.weight.item() == pytest.approx(9 / 11)
    assert lin.weight.item() == 1.0
