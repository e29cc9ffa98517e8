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
"""

from __future__ import annotations

import warnings
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


def _as_items(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or len(array) == 0:
        raise VitlabError(
            f"{name}: expected a non-empty 1-D array of per-item values, got shape {array.shape}"
        )
    if not np.isfinite(array).all():
        raise VitlabError(f"{name}: holds NaN or infinite values")
    return array
