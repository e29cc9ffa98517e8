import math

import numpy as np
import pytest

from vitlab.errors import VitlabError
from vitlab.stats import Interval, bootstrap_ci, paired_bootstrap_diff


def _correct(n: int, hits: int, seed: int = 0) -> np.ndarray:
    """0/1 per item with exactly ``hits`` ones in random positions."""
    flags = np.zeros(n)
    flags[np.random.default_rng(seed).choice(n, hits, replace=False)] = 1.0
    return flags


def test_accuracy_interval_matches_the_binomial_normal_approximation():
    n, p = 1000, 0.6
    interval = bootstrap_ci(_correct(n, int(n * p)))
    half_width = 1.959964 * math.sqrt(p * (1 - p) / n)  # 0.0304
    assert interval.estimate == pytest.approx(p)
    assert interval.low == pytest.approx(p - half_width, abs=0.003)
    assert interval.high == pytest.approx(p + half_width, abs=0.003)
    assert interval.confidence == 0.95


def test_a_constant_sample_has_a_zero_width_interval():
    assert bootstrap_ci(np.full(50, 0.25)) == Interval(0.25, 0.25, 0.25)


def test_a_lower_confidence_gives_a_narrower_interval():
    values = _correct(400, 300)
    wide, narrow = bootstrap_ci(values, confidence=0.99), bootstrap_ci(values, confidence=0.8)
    assert wide.low < narrow.low < 0.75 < narrow.high < wide.high


def test_intervals_are_reproducible_from_the_seed():
    values = np.random.default_rng(1).normal(size=300)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)


def test_resampling_in_chunks_gives_the_same_means_as_at_once(monkeypatch):
    import vitlab.stats

    values = np.random.default_rng(2).normal(size=100)
    at_once = bootstrap_ci(values, resamples=1000)
    monkeypatch.setattr(vitlab.stats, "_CHUNK_ELEMENTS", 3 * 100)  # 3 resamples per chunk, 334 chunks
    assert bootstrap_ci(values, resamples=1000) == at_once


def test_95_percent_intervals_cover_the_true_accuracy_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    trials, n, p = 300, 200, 0.7
    covered = 0
    for trial in range(trials):
        interval = bootstrap_ci((rng.random(n) < p).astype(float), resamples=1000, seed=trial)
        covered += interval.low <= p <= interval.high
    # Binomial(300, 0.95) lies in [0.92, 0.98] with probability > 0.99; the percentile bootstrap of a
    # proportion under-covers slightly at n=200, which this range allows.
    assert 0.90 <= covered / trials <= 0.98


def test_paired_difference_of_identical_runs_is_exactly_zero():
    a = _correct(500, 320)
    assert paired_bootstrap_diff(a, a.copy()) == Interval(0.0, 0.0, 0.0)


def test_paired_difference_of_a_few_fixed_mistakes():
    # b is a with 10 of its mistakes turned right: every per-image difference is 0 or 1.
    n = 1000
    a = _correct(n, 600)
    b = a.copy()
    b[np.flatnonzero(a == 0)[:10]] = 1.0
    diff = paired_bootstrap_diff(b, a)
    assert diff.estimate == pytest.approx(0.01)
    assert diff.low >= 0.0  # no resample can have b worse than a
    half_width = 1.959964 * math.sqrt(0.01 * 0.99 / n)  # 0.0062
    assert diff.high == pytest.approx(0.01 + half_width, abs=0.002)
    assert paired_bootstrap_diff(a, b).estimate == pytest.approx(-0.01)


def test_pairing_makes_the_difference_of_correlated_runs_much_narrower():
    # b fixes 40 of a's mistakes and breaks 10 of its right answers: 3 points better, agreeing on 95% of
    # the images. The separate intervals overlap; the paired difference is clearly positive.
    n = 1000
    a = _correct(n, 600)
    b = a.copy()
    b[np.flatnonzero(a == 0)[:40]] = 1.0
    b[np.flatnonzero(a == 1)[:10]] = 0.0
    paired = paired_bootstrap_diff(b, a)
    separate_a, separate_b = bootstrap_ci(a), bootstrap_ci(b)
    assert paired.estimate == pytest.approx(0.03)
    assert separate_b.low < separate_a.high
    assert paired.low > 0.01
    assert paired.high - paired.low < 0.5 * (separate_a.high - separate_a.low)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: bootstrap_ci(np.array([])), "non-empty 1-D"),
        (lambda: bootstrap_ci(np.ones((3, 2))), "non-empty 1-D"),
        (lambda: bootstrap_ci(np.array([1.0, np.nan])), "NaN"),
        (lambda: bootstrap_ci(np.ones(3), confidence=1.0), "strictly between 0 and 1"),
        (lambda: bootstrap_ci(np.ones(3), resamples=0), "resamples must be positive"),
        (lambda: paired_bootstrap_diff(np.ones(3), np.ones(4)), "differ in length: 3 vs 4"),
    ],
)
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises(VitlabError, match=message):
        call()


def test_interval_prints_estimate_and_bounds():
    assert str(Interval(0.5, 0.45, 0.55)) == "0.5000 [0.4500, 0.5500]"
