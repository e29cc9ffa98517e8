import math

import numpy as np
import pytest
from scipy import stats

from vitlab.errors import VitlabError
from vitlab.stats import Interval, SeedSpread, bootstrap_ci, over_seeds, paired_bootstrap_diff


def _correct(n: int, hits: int, seed: int = 0) -> np.ndarray:
    """0/1 per item with exactly ``hits`` ones in random positions."""
    flags = np.zeros(n)
    flags[np.random.default_rng(seed).choice(n, hits, replace=False)] = 1.0
    return flags


def _realistic(case: str) -> tuple[np.ndarray, ...]:
    """Per-image values like a CIFAR-10 test run on 1,017 images: one model's, or two models' (paired)."""
    n = 1017
    a = _correct(n, 458)  # 45.0% accuracy
    if case == "accuracy":
        return (a,)
    if case == "paired":  # another model fixes 60 of a's mistakes and breaks 40 right answers: +2.0 points
        b = a.copy()
        rng = np.random.default_rng(1)
        b[rng.choice(np.flatnonzero(a == 0), 60, replace=False)] = 1.0
        b[rng.choice(np.flatnonzero(a == 1), 40, replace=False)] = 0.0
        return b, a
    # Cross-entropy losses, right-skewed like the committed run's (mean 1.56, sd 0.93, skew 0.78).
    return (np.random.default_rng(2).gamma(2.8, 1.56 / 2.8, n),)


# The percentile intervals of the code scipy replaced (commit ee1a1e8; seed 0, 10,000 resamples), and the
# resampling noise of each endpoint: sqrt(sd_old^2 + sd_new^2), each sd over seeds 0-39 of the old
# percentile and the new BCa code, as both intervals are noisy. BCa's skew correction moved the loss
# interval by +0.001 on average over those seeds, the others by under 0.0003: within the noise.
BEFORE = {
    "accuracy": ((0.419862, 0.480826), (0.00065, 0.00074)),
    "paired": ((0.0, 0.039331), (0.00064, 0.00064)),
    "loss": ((1.439557, 1.550458), (0.00113, 0.00126)),
}


@pytest.mark.parametrize("case", sorted(BEFORE))
def test_intervals_agree_with_the_percentile_intervals_before_scipy(case):
    (low, high), (sd_low, sd_high) = BEFORE[case]
    values = _realistic(case)
    interval = paired_bootstrap_diff(*values) if len(values) == 2 else bootstrap_ci(*values)
    # 3 sd: a difference of two noisy endpoints exceeds it with probability 0.3% (normal noise).
    assert interval.low == pytest.approx(low, abs=3 * sd_low)
    assert interval.high == pytest.approx(high, abs=3 * sd_high)


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
    # Binomial(300, 0.95) lies in [0.92, 0.98] with probability > 0.99; a bootstrap interval of a proportion
    # is approximate at n=200 (it may under-cover slightly), which this range allows.
    assert 0.90 <= covered / trials <= 0.98


def test_paired_difference_of_identical_runs_is_exactly_zero():
    a = _correct(500, 320)
    assert paired_bootstrap_diff(a, a.copy()) == Interval(0.0, 0.0, 0.0)


def test_paired_difference_of_a_few_fixed_mistakes_follows_the_exact_binomial_interval():
    # b is a with 10 of its mistakes turned right: every per-image difference is 0 or 1, so the difference
    # is a proportion with the exact (Clopper-Pearson) interval [0.0048, 0.0183]. Its resampled means are
    # skewed (a count near 0), which BCa corrects; the percentile interval was [0.004, 0.017].
    n = 1000
    a = _correct(n, 600)
    b = a.copy()
    b[np.flatnonzero(a == 0)[:10]] = 1.0
    diff = paired_bootstrap_diff(b, a)
    exact = stats.binomtest(10, n).proportion_ci()
    assert diff.estimate == pytest.approx(0.01)
    assert diff.low >= 0.0  # no resample can have b worse than a
    # The endpoints lie on the 1/n = 0.001 grid of resampled means: one step off the exact bounds at most.
    assert diff.low == pytest.approx(exact.low, abs=1 / n)
    assert diff.high == pytest.approx(exact.high, abs=1 / n)
    assert paired_bootstrap_diff(a, b).estimate == pytest.approx(-0.01)


def test_one_right_answer_in_a_thousand_gets_the_exact_upper_bound():
    # The percentile interval's upper end was 0.003 (fewer than 2.5% of resamples draw the one hit 4+
    # times), half the exact bound 0.0056; BCa's over seeds 0-7 was 0.0050-0.0060.
    values = np.zeros(1000)
    values[0] = 1.0
    interval = bootstrap_ci(values)
    assert interval.low == 0.0
    assert interval.high == pytest.approx(stats.binomtest(1, 1000).proportion_ci().high, abs=1e-3)


def test_pairing_is_scipys_paired_resampling_of_the_items():
    # Bootstrapping a - b draws the same item indices for both models, as scipy's paired=True does.
    rng = np.random.default_rng(0)
    a, b = rng.gamma(2.8, 0.56, 300), rng.gamma(2.8, 0.5, 300)
    ours = paired_bootstrap_diff(a, b, resamples=2000, seed=5)
    scipys = stats.bootstrap(
        (a, b),
        lambda x, y, axis: x.mean(axis=axis) - y.mean(axis=axis),
        n_resamples=2000,
        paired=True,
        vectorized=True,
        rng=np.random.default_rng(5),
    ).confidence_interval
    assert (ours.low, ours.high) == pytest.approx((scipys.low, scipys.high), rel=1e-9)


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
        # One resample lies on one side of the estimate: BCa's bias correction is infinite.
        (lambda: bootstrap_ci(np.arange(30.0), resamples=1), "no BCa interval from 1 resamples of 30 items"),
        (lambda: paired_bootstrap_diff(np.ones(3), np.ones(4)), "differ in length: 3 vs 4"),
    ],
)
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises(VitlabError, match=message):
        call()


def test_interval_prints_estimate_and_bounds():
    assert str(Interval(0.5, 0.45, 0.55)) == "0.5000 [0.4500, 0.5500]"


def _first(n: int, hits: int) -> np.ndarray:
    """0/1 per item: the first ``hits`` items right, the rest wrong."""
    return (np.arange(n) < hits).astype(float)


def test_a_seed_group_reports_each_seeds_accuracy_their_mean_and_sample_std():
    # Three seeds right on the first 10, 12 and 14 of 20 images: 50%, 60%, 70%; mean 60%, sd 10 points with
    # ddof=1 (sqrt(((-.1)^2 + 0 + .1^2) / 2)); with ddof=0 it would be 8.16.
    n = 20
    group = over_seeds({2: _first(n, 14), 0: _first(n, 10), 1: _first(n, 12)}, resamples=2000)
    assert group.accuracy_over_seeds.seeds == (0, 1, 2)
    assert group.accuracy_over_seeds.values == pytest.approx((0.5, 0.6, 0.7))
    assert group.accuracy_over_seeds.mean == pytest.approx(0.6)
    assert group.accuracy_over_seeds.std == pytest.approx(0.1)
    assert str(group.accuracy_over_seeds) == "0.6000 ± 0.1000 (3 seeds)"
    # The interval resamples each image's correctness averaged over the seeds: 1 on the first 10 images,
    # 2/3 on the next 2, 1/3 on the 2 after, 0 on the last 6.
    averaged = np.array([1.0] * 10 + [2 / 3] * 2 + [1 / 3] * 2 + [0.0] * 6)
    assert group.accuracy == bootstrap_ci(averaged, resamples=2000)
    assert group.accuracy.estimate == pytest.approx(0.6)
    assert group.vs_baseline is None and group.vs_baseline_over_seeds is None


def test_a_seed_groups_difference_to_the_baseline_pairs_images_and_seeds():
    # The group's seeds are right on 12 and 16 of 20 images, the baseline's same seeds on 10 and 10 (other
    # images for seed 1): per-seed differences +10 and +30 points, mean +20, sd 14.14.
    n = 20
    group = {0: _first(n, 12), 1: _first(n, 16)}
    baseline = {0: _first(n, 10), 1: 1.0 - _first(n, 10)}
    stats = over_seeds(group, baseline, resamples=2000)
    assert stats.vs_baseline_over_seeds.values == pytest.approx((0.1, 0.3))
    assert stats.vs_baseline_over_seeds.std == pytest.approx(0.2 / np.sqrt(2))
    assert stats.vs_baseline.estimate == pytest.approx(0.2) == stats.vs_baseline_over_seeds.mean
    averaged, baseline_averaged = (group[0] + group[1]) / 2, np.full(n, 0.5)
    assert stats.vs_baseline == paired_bootstrap_diff(averaged, baseline_averaged, resamples=2000)
    # Against a baseline run with other seeds there is no per-seed pairing, but the seed averages still pair.
    other_seeds = over_seeds(group, {5: baseline[0], 6: baseline[1]}, resamples=2000)
    assert other_seeds.vs_baseline == stats.vs_baseline and other_seeds.vs_baseline_over_seeds is None


def test_a_single_seed_is_exactly_the_single_run_interval_and_difference():
    a, b = _correct(300, 180, seed=1), _correct(300, 150, seed=2)
    stats = over_seeds({None: a}, {None: b}, resamples=1000, seed=3)
    assert stats.accuracy == bootstrap_ci(a, resamples=1000, seed=3)
    assert stats.vs_baseline == paired_bootstrap_diff(a, b, resamples=1000, seed=3)
    assert stats.accuracy_over_seeds == SeedSpread((None,), (0.6,))
    assert stats.accuracy_over_seeds.std is None and str(stats.accuracy_over_seeds) == "0.6000 (1 seed)"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: over_seeds({}), "correct: no seeds' runs"),
        (
            lambda: over_seeds({0: np.ones(5), 1: np.ones(4)}),
            r"correct: the seeds' runs were scored on different numbers of items \(seed 0: 5, seed 1: 4\)",
        ),
        (lambda: over_seeds({0: np.ones(5)}, {0: np.ones(4)}), "differ in length: 5 vs 4"),
        (lambda: over_seeds({0: np.array([1.0, np.nan])}), "correct, seed 0: holds NaN"),
    ],
)
def test_bad_seed_groups_are_a_clear_error(call, message):
    with pytest.raises(VitlabError, match=message):
        call()
