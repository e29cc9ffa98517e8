"""Bootstrap confidence intervals for test-set figures, and paired differences between two models.

Percentile bootstrap (Efron & Tibshirani, 1993): resample the test images with replacement, recompute the
mean of a per-image quantity (1 for a correct prediction, or the image's loss), and read the interval off
the percentiles of those means. Two models scored on the same images are compared by resampling the images
once for both, i.e. bootstrapping the per-image differences: the images' shared difficulty cancels, so the
interval of the difference is much narrower than the two separate intervals would suggest.

Every resampling draws from ``numpy.random.default_rng(seed)``: the same inputs give the same interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vitlab.errors import VitlabError

RESAMPLES = 10_000
CONFIDENCE = 0.95
_CHUNK_ELEMENTS = 4_000_000  # resampled values held at once (32 MB of int64 indices)


@dataclass(frozen=True)
class Interval:
    """A mean over items and its bootstrap confidence interval [low, high]."""

    estimate: float
    low: float
    high: float
    confidence: float = CONFIDENCE

    def __str__(self) -> str:
        return f"{self.estimate:.4f} [{self.low:.4f}, {self.high:.4f}]"


def bootstrap_ci(
    values: np.ndarray,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Interval:
    """The mean of ``values`` (one number per test image) with its percentile bootstrap interval."""
    values = _as_items(values, "values")
    if not 0.0 < confidence < 1.0:
        raise VitlabError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if resamples < 1:
        raise VitlabError(f"resamples must be positive, got {resamples}")
    rng = np.random.default_rng(seed)
    n = len(values)
    chunk = max(1, _CHUNK_ELEMENTS // n)
    means = np.concatenate(
        [
            values[rng.integers(0, n, size=(min(chunk, resamples - start), n))].mean(axis=1)
            for start in range(0, resamples, chunk)
        ]
    )
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return Interval(float(values.mean()), float(low), float(high), confidence)


def paired_bootstrap_diff(
    a: np.ndarray,
    b: np.ndarray,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Interval:
    """mean(a) - mean(b) for two models scored on the same items (a[i], b[i]: item i), with its interval."""
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
