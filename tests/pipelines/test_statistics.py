"""Seed statistics against hand computations."""

import math

import pytest

from kdcache.pipeline.statistics import NOISE_SE, format_summary, paired_gaps, summarise


def test_summary_matches_hand_computation():
    s = summarise([0.46, 0.63, 0.44])
    mean = (0.46 + 0.63 + 0.44) / 3  # 0.51
    sd = math.sqrt(((0.46 - mean) ** 2 + (0.63 - mean) ** 2 + (0.44 - mean) ** 2) / 2)
    assert s.n == 3
    assert s.mean == pytest.approx(0.51)
    assert s.sd == pytest.approx(sd) and s.sd == pytest.approx(0.10440306508910549)
    assert s.se == pytest.approx(sd / math.sqrt(3))
    assert s.beyond_noise and s.verdict == "gain"


def test_noise_and_worse_verdicts():
    # the n2n (λ=10) energy row: −4 %, −6 %, −1 % -> mean −3.67 %, se 1.45 %: worse beyond noise
    worse = summarise([-0.04, -0.06, -0.01])
    assert worse.mean == pytest.approx(-0.036666, abs=1e-5)
    assert worse.verdict == "worse" and not worse.beyond_noise
    # v2v (1000) energy: +2, −1, −2 %: within noise
    noisy = summarise([0.02, -0.01, -0.02])
    assert noisy.verdict == "noise" and not noisy.beyond_noise
    # exactly at the threshold is not a gain
    s = summarise([1.0, 3.0])  # mean 2, sd sqrt(2), se 1
    assert s.se == pytest.approx(1.0)
    assert NOISE_SE == 2.0 and not s.beyond_noise


def test_non_finite_values_and_single_seed():
    s = summarise([float("nan"), 0.3])
    assert s.n == 1 and s.mean == pytest.approx(0.3) and math.isnan(s.se)
    assert not s.beyond_noise and s.verdict == "noise"
    empty = summarise([float("nan")])
    assert empty.n == 0 and format_summary(empty) == "n/a"


def test_paired_gaps_use_same_seed_baseline():
    # baseline varies a lot between seeds; the distilled student is 10 % of the gap better each time
    baseline = [1000.0, 700.0, 850.0]
    teacher = 500.0
    distilled = [b - 0.1 * (b - teacher) for b in baseline]
    gaps = paired_gaps(baseline, distilled, teacher)
    mean_gap = sum(baseline) / 3 - teacher  # 350
    assert gaps == pytest.approx([0.1 * (b - teacher) / mean_gap for b in baseline])  # 0.143, 0.057, 0.1
    s = summarise(gaps)
    assert s.mean == pytest.approx(0.1)  # = the gap closed of the mean metrics
    # unpaired (distilled seed 1 against baseline seed 0) would not give 10 %
    assert paired_gaps([1000.0], [distilled[1]], teacher) != pytest.approx([0.1])
    # the denominator is the mean baseline's gap: a seed whose baseline is nearly as good as the
    # teacher does not blow its ratio up (per-seed denominators would give (560-550)/(560-500) = 17 %)
    gaps = paired_gaps([1000.0, 560.0], [955.0, 550.0], 500.0)
    assert gaps == pytest.approx([45 / 280, 10 / 280])
    # no gap to close on average: undefined, not a misleading ratio
    assert all(g != g for g in paired_gaps([500.0, 520.0], [450.0, 500.0], 515.0))
    # higher-is-better metrics
    assert paired_gaps([0.5], [0.6], 0.9, higher_is_better=True) == pytest.approx([0.25])
    with pytest.raises(ValueError):
        paired_gaps([1.0, 2.0], [1.0], 0.5)


def test_format_summary():
    s = summarise([0.2, 0.3, 0.25])
    assert format_summary(s, scale=100, pct=True, error="se") == "+25.0 ± 2.9 %"
    assert format_summary(summarise([673.0, 1017.0]), digits=0) == "845 ± 243"
