"""Bootstrap confidence intervals for test-set figures, and paired differences between two models.

Resample the test images with replacement, recompute the mean of a per-image quantity (1 for a correct
prediction, or the image's loss) and read the interval off those means (Efron & Tibshirani, 1993, "An
Introduction to the Bootstrap"), with ``scipy.stats.bootstrap``. The interval is BCa, bias-corrected and
accelerated (Efron, 1987, "Better Bootstrap Confidence Intervals", JASA 82): it corrects the percentile
interval for the skew of the resampled means, which matters for accuracies near 0 or 1 and for differences
where few images disagree (95% intervals of a proportion at p = 0.97, n = 200 covered the truth 96% of the
time, percentile ones 93%).

Two models scored on the same images are compared by resampling the images once for both, i.e.
bootstrapping the per-image differences: the images' shared difficulty cancels, so the interval of the
difference is much narrower than the two separate intervals would suggest. For a difference of means this
is what ``scipy.stats.bootstrap(..., paired=True)`` resamples, at half the cost, and on 0/1 data the
resampled means equal to the estimate stay exactly equal (BCa's bias correction counts the means below it).

A constant sample (one value repeated, e.g. two models that agree on every image) has no BCa interval in
scipy (its acceleration is 0/0); every resample has the same mean, so its interval is that mean.

Every resampling draws from ``numpy.random.default_rng(seed)``: the same inputs give the same interval.

Runs of one configuration that differ only in their training seed (``over_seeds``) have two kinds of
uncertainty, reported side by side and never mixed: the spread over seeds (sample standard deviation,
ddof=1) is training noise, what another seed would change (initial weights, data order, augmentation); the
bootstrap interval over the test images is test-set sampling, what other images from the same distribution
would change, with these seeds' models held fixed. The interval bootstraps each image's correctness
averaged over the seeds, so its estimate is the mean accuracy over seeds.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

from vitlab.errors import VitlabError

RESAMPLES = 10_000
CONFIDENCE = 0.95
_CHUNK_ELEMENTS = 4_000_000  # resampled values held at once (32 MB of int64 indices)


@dataclass(frozen=True)
class Interval:
    """A mean over items (``estimate``) and its bootstrap confidence interval [``low``, ``high``], in the
    items' unit (a share of images for accuracy, nats for a cross-entropy loss); ``confidence`` in (0, 1)."""

    estimate: float
    low: float
    high: float
    confidence: float = CONFIDENCE

    def __str__(self) -> str:
        """``estimate [low, high]``, four decimals each."""
        return f"{self.estimate:.4f} [{self.low:.4f}, {self.high:.4f}]"


def bootstrap_ci(
    values: np.ndarray,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Interval:
    """The mean of ``values`` with its BCa bootstrap interval.

    Args:
        values: (N,) one finite number per test image (0/1 correctness, a loss...), any real dtype.
        confidence: coverage of the two-sided interval, strictly between 0 and 1.
        resamples: bootstrap resamples of the N items.
        seed: seed of ``numpy.random.default_rng``; the same inputs and seed give the same interval.

    Raises:
        VitlabError: ``values`` is not a non-empty 1-D finite array, ``confidence`` or ``resamples`` is out
            of range, or too few resamples leave the BCa interval undefined.
    """
    values = _as_items(values, "values")
    if not 0.0 < confidence < 1.0:
        raise VitlabError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if resamples < 1:
        raise VitlabError(f"resamples must be positive, got {resamples}")
    estimate = float(values.mean())
    if np.ptp(values) == 0:
        return Interval(estimate, estimate, estimate, confidence)
    with warnings.catch_warnings():
        # scipy warns and returns NaN where BCa is undefined; the check below turns that into an error.
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.bootstrap(
            (values,),
            np.mean,
            n_resamples=resamples,
            batch=max(1, _CHUNK_ELEMENTS // len(values)),
            vectorized=True,
            confidence_level=confidence,
            method="BCa",
            rng=np.random.default_rng(seed),
        )
    low, high = result.confidence_interval
    if not (np.isfinite(low) and np.isfinite(high)):
        # All resampled means on one side of the estimate: BCa's bias correction is infinite.
        raise VitlabError(
            f"no BCa interval from {resamples} resamples of {len(values)} items: use more resamples"
        )
    return Interval(estimate, float(low), float(high), confidence)


def paired_bootstrap_diff(
    a: np.ndarray,
    b: np.ndarray,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Interval:
    """mean(a) - mean(b) for two models scored on the same items, with its paired BCa bootstrap interval.

    Args:
        a, b: (N,) per-item values of the two models, a[i] and b[i] on item i (finite, any real dtype).
        confidence, resamples, seed: as in ``bootstrap_ci``.

    Raises:
        VitlabError: as ``bootstrap_ci``, or ``a`` and ``b`` differ in length.
    """
    a, b = _as_items(a, "a"), _as_items(b, "b")
    if a.shape != b.shape:
        raise VitlabError(f"paired samples differ in length: {len(a)} vs {len(b)} items")
    return bootstrap_ci(a - b, confidence, resamples, seed)


@dataclass(frozen=True)
class SeedSpread:
    """A figure measured once per training seed: ``values[i]`` is seed ``seeds[i]``'s (a share of the test
    images for an accuracy, a difference of two shares for a paired difference). ``seeds`` holds None for a
    run whose seed was not recorded."""

    seeds: tuple[int | None, ...]
    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        """The mean over seeds."""
        return float(np.mean(self.values))

    @property
    def std(self) -> float | None:
        """The sample standard deviation over seeds (ddof=1, the unbiased variance's root); None for one seed,
        which has no spread to measure."""
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else None

    def __str__(self) -> str:
        """``mean ± std (n seeds)``, four decimals each; no ``± std`` for one seed."""
        spread = "" if self.std is None else f" ± {self.std:.4f}"
        seeds = f"{len(self.values)} seed{'s' if len(self.values) > 1 else ''}"
        return f"{self.mean:.4f}{spread} ({seeds})"


@dataclass(frozen=True)
class SeedGroupStats:
    """A configuration's accuracy over its training seeds (``over_seeds`` defines each field)."""

    accuracy: Interval  # seed-averaged correctness, BCa over the test images: test-set sampling
    accuracy_over_seeds: SeedSpread  # each seed's accuracy: training noise
    vs_baseline: Interval | None  # seed-averaged correctness minus the baseline's, paired BCa over the images
    vs_baseline_over_seeds: SeedSpread | None  # each seed's accuracy minus the baseline's of the same seed


def over_seeds(
    correct: Mapping[int | None, np.ndarray],
    baseline: Mapping[int | None, np.ndarray] | None = None,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> SeedGroupStats:
    """Accuracy of the runs of one configuration that differ only in training seed, and its paired
    difference to a baseline configuration's runs, on the same N test images.

    With c_s the (N,) correctness of seed s's model and S seeds, each image's seed-averaged correctness is
    m = mean_s c_s (a value in {0, 1/S, ..., 1}):

    - ``accuracy``: mean(m), equal to the mean over seeds of the accuracies, with the BCa bootstrap interval
      of resampling the N images of m: it covers test-set sampling, the seeds' models held fixed;
    - ``accuracy_over_seeds``: the accuracies mean(c_s), their mean and sample std (ddof=1): training noise;
    - ``vs_baseline``: mean(m) - mean(m_b), m_b the baseline's seed-averaged correctness, with the paired BCa
      interval (``paired_bootstrap_diff``: each resample draws the same images for m and m_b);
    - ``vs_baseline_over_seeds``: mean(c_s) - mean(c_b,s) for each seed s, pairing a seed's run with the
      baseline's run of the same seed; defined only when both configurations ran the same seeds (None
      otherwise). Its mean then equals ``vs_baseline``'s estimate.

    With one seed, ``accuracy`` and ``vs_baseline`` are ``bootstrap_ci`` and ``paired_bootstrap_diff`` of
    that run's correctness, exactly.

    Args:
        correct: training seed -> (N,) per-image correctness (0/1, any real dtype) of that seed's model;
            every array lists the same N images in the same order.
        baseline: the same for the baseline configuration (its own seeds), or None for no difference.
        confidence, resamples, seed: as in ``bootstrap_ci`` (``seed`` seeds the bootstrap, not training).

    Raises:
        VitlabError: ``correct`` is empty, the arrays differ in length, or as ``bootstrap_ci``.
    """
    seeds, averaged = _seed_average(correct, "correct")
    per_seed = SeedSpread(seeds, tuple(float(_as_items(correct[s], "correct").mean()) for s in seeds))
    accuracy = bootstrap_ci(averaged, confidence, resamples, seed)
    if baseline is None:
        return SeedGroupStats(accuracy, per_seed, None, None)
    baseline_seeds, baseline_averaged = _seed_average(baseline, "baseline")
    vs_baseline = paired_bootstrap_diff(averaged, baseline_averaged, confidence, resamples, seed)
    diffs = None
    if set(baseline_seeds) == set(seeds):
        values = (v - float(np.mean(baseline[s])) for s, v in zip(seeds, per_seed.values, strict=True))
        diffs = SeedSpread(seeds, tuple(values))
    return SeedGroupStats(accuracy, per_seed, vs_baseline, diffs)


def _seed_average(
    values: Mapping[int | None, np.ndarray], name: str
) -> tuple[tuple[int | None, ...], np.ndarray]:
    """The seeds (sorted, None first) and the (N,) mean over seeds of their per-item values."""
    if not values:
        raise VitlabError(f"{name}: no seeds' runs")
    seeds = tuple(sorted(values, key=lambda s: (s is not None, s or 0)))
    arrays = [_as_items(values[s], f"{name}, seed {s}") for s in seeds]
    lengths = {len(a) for a in arrays}
    if len(lengths) > 1:
        counts = ", ".join(f"seed {s}: {len(a)}" for s, a in zip(seeds, arrays, strict=True))
        raise VitlabError(f"{name}: the seeds' runs were scored on different numbers of items ({counts})")
    return seeds, np.mean(arrays, axis=0)


def _as_items(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or len(array) == 0:
        raise VitlabError(
            f"{name}: expected a non-empty 1-D array of per-item values, got shape {array.shape}"
        )
    if not np.isfinite(array).all():
        raise VitlabError(f"{name}: holds NaN or infinite values")
    return array
