"""Decision thresholds from good images only, with a stated false-alarm rate.

Every training image is scored against a bank that did not see it. The default ("leave-out",
scorer/heldout.py): the coreset the build would have made without the image (the shipped coreset less the
image's points - and, for video frames, its near-twin neighbours' - repaired by the same greedy selection),
so the good scores are what the shipped bank gives an unseen good image at any training-set size. The older
"kfold": each fold against a coreset of the other folds (contiguous folds for video frames); its banks hold
(k-1)/k of the images (kept for comparison, bench/threshold_sizes.py). An image score is the maximum over
many patch distances, so its distribution has an extreme-value (Gumbel) tail: a Gumbel fitted to the good
scores by maximum likelihood gives the threshold at a target false-alarm rate, far steadier than mean + k
std or an empirical quantile of a few hundred images; `tail_fit_pvalue` checks the fit.

A fit from n good scores is itself uncertain, the more so the fewer the images: `TailFits` gives the threshold
that holds the target rate with a stated `confidence` (in that share of training sets of n images the true rate
at it is at or under the target), and the interval of the false-alarm rate at a threshold (`rate_interval`,
reported with every bank fitted at a rate). Banks from before stored no confidence: theirs is the fitted tail's
own quantile (the plug-in estimate, `confidence=None`), which at 30 images holds the rate in only ~45 % of sets.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from scipy import stats


CALIBRATION_METHODS = ("leave-out", "kfold")
TAIL_DRAWS = 1000  # standard Gumbel samples TailFits refits (fewer: its intervals cover less than they say)
TAIL_SEED = 0  # their seed: a bank rebuilt from the same images gets the same threshold
RATE_INTERVAL_LEVEL = 0.9  # the false-alarm rate's interval reported with a threshold
TAIL_MISFIT_P = 0.05  # a tail fit whose KS p-value is below this is a misfit (tail_fit_pvalue)
RATE_SPREAD_ADVICE = 1.5  # advise more good images when the rate's interval reaches this multiple of the target


@dataclass(frozen=True)
class CalibrationConfig:
    folds: int = field(default=5, metadata={"help": "Threshold calibration: 0 = no threshold; kfold: k of the k-fold "
                                                    "scoring; leave-out with --contiguous: the n/k frames around an "
                                                    "image (n/2k each side) are left out with it."})
    contiguous: bool = field(default=False, metadata={  # instead of a seeded shuffle
        "help": "Consecutive images (video frames): near-twins are left out with each image (kfold: folds of "
                "consecutive runs)."})
    false_alarm_rate: float = field(default=0.01, metadata={"help": "Target share of good images at or over the threshold."})
    method: str = field(default="leave-out", metadata={
        "help": "leave-out (each image against the shipped coreset less its own features) or kfold."})
    # 0.75 by measurement: bench/threshold_sizes.py on two sets at 30-300 images (docs/scorer.md, "The good-only
    # threshold at any training-set size")
    confidence: float = field(default=0.75, metadata={
        "help": "How sure the threshold is to hold --false-alarm-rate, given how many good images it was fitted "
                "from: at or under the rate in this share of training sets (0.5: as likely over as under; "
                "higher = a higher threshold, the more so the fewer the images)."})

    def __post_init__(self) -> None:
        if self.folds == 1 or self.folds < 0:
            raise ValueError(f"calibration folds must be 0 (none) or >= 2, got {self.folds}")
        if not 0 < self.false_alarm_rate < 0.5:
            raise ValueError(f"false-alarm rate must be in (0, 0.5), got {self.false_alarm_rate}")
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(f"unknown calibration method {self.method!r}; choose from {', '.join(CALIBRATION_METHODS)}")
        check_confidence(self.confidence)

    def twin_window(self, n_images: int) -> int:
        """Leave-out: how many neighbours on each side of an image are left out with it (0 unless contiguous):
        n/2k, at most (n - 2) // 2 so that every image keeps at least one other image to be scored against."""
        if not (self.contiguous and self.folds):
            return 0
        return min(-(-n_images // (2 * self.folds)), max(0, (n_images - 2) // 2))


def fold_ids(n_images: int, folds: int, contiguous: bool, seed: int) -> np.ndarray:
    """The fold (0..k-1) of each image: contiguous runs, or a seeded balanced shuffle."""
    if folds < 2 or n_images < folds:
        raise ValueError(f"{folds}-fold calibration needs at least {max(folds, 2)} training images, got {n_images}")
    ids = np.arange(n_images) * folds // n_images  # balanced contiguous runs
    if not contiguous:
        ids = ids[np.random.default_rng(seed).permutation(n_images)]
    return ids


@dataclass(frozen=True)
class TailFit:
    location: float
    scale: float

    def quantile(self, false_alarm_rate: float) -> float:
        return float(stats.gumbel_r.ppf(1.0 - false_alarm_rate, loc=self.location, scale=self.scale))

    def false_alarm_rate(self, threshold: float) -> float:
        return float(stats.gumbel_r.sf(threshold, loc=self.location, scale=self.scale))


def fit_tail(good_scores: np.ndarray) -> TailFit:
    """Maximum-likelihood Gumbel fit of good image scores (at least 5)."""
    scores = np.asarray(good_scores, dtype=np.float64)
    if len(scores) < 5 or not np.all(np.isfinite(scores)):
        raise ValueError(f"a tail fit needs at least 5 finite good scores, got {len(scores)}")
    if float(np.ptp(scores)) == 0.0:  # identical scores: a degenerate, very narrow tail
        return TailFit(float(scores[0]), max(abs(float(scores[0])) * 1e-6, 1e-12))
    location, scale = stats.gumbel_r.fit(scores)
    return TailFit(float(location), float(scale))


def tail_fit_pvalue(good_scores: np.ndarray) -> float:
    """How well the fitted Gumbel describes the good scores: the Kolmogorov-Smirnov p-value of the scores
    against it (parameters estimated from the same scores, so the p-value is conservative: a low one, e.g.
    < 0.05, is a real misfit and the threshold's false-alarm rate should not be trusted)."""
    scores = np.asarray(good_scores, dtype=np.float64)
    fit = fit_tail(scores)
    return float(stats.kstest(scores, "gumbel_r", args=(fit.location, fit.scale)).pvalue)


def check_confidence(confidence: float) -> None:
    if not 0.5 <= confidence < 1:
        raise ValueError(f"threshold confidence must be in [0.5, 1), got {confidence}")


class TailFits:
    """What n good scores leave unknown about their tail. The Gumbel is a location-scale family and its maximum-
    likelihood fit is equivariant, so (q - location_hat) / scale_hat has one distribution whatever the true tail
    (a pivot): drawn here from `draws` samples of n standard Gumbel scores, each refitted (seeded: a bank rebuilt
    from the same images gets the same threshold). From it, exact under the Gumbel up to the draws: the threshold
    that holds a rate with a given confidence, and the false-alarm rates a threshold placed like the stored one
    (location_hat + k scale_hat) has across training sets of n images. Wide at 30 images, narrow at 300."""

    def __init__(self, good_scores: np.ndarray, draws: int = TAIL_DRAWS, seed: int = TAIL_SEED):
        scores = np.asarray(good_scores, dtype=np.float64)
        self.fit = fit_tail(scores)
        # [draws] each: fits of standard Gumbel samples of n scores (they depend on n only: computed once per n)
        self.locations, self.scales = standard_refits(len(scores), draws, seed)

    def threshold(self, false_alarm_rate: float, confidence: float | None = None) -> float:
        """The score that holds `false_alarm_rate` with `confidence` (in that share of training sets the true
        rate at it is at or under the target); None: the fit's own quantile (the plug-in estimate)."""
        if confidence is None:
            return self.fit.quantile(false_alarm_rate)
        check_confidence(confidence)
        pivots = (stats.gumbel_r.isf(false_alarm_rate) - self.locations) / self.scales
        return self.fit.location + self.fit.scale * float(np.quantile(pivots, confidence))

    def rate_interval(self, threshold: float, level: float = RATE_INTERVAL_LEVEL) -> tuple[float, float]:
        """The central `level` share of the true false-alarm rates that a threshold placed as this one is,
        relative to the fit, has across training sets of the same size: (low, high)."""
        k = (threshold - self.fit.location) / self.fit.scale
        rates = stats.gumbel_r.sf(self.locations + self.scales * k)
        low, high = np.quantile(rates, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
        return float(low), float(high)


@functools.lru_cache(maxsize=64)
def standard_refits(n: int, draws: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Locations and scales [draws] of the Gumbel fits of `draws` samples of n standard Gumbel scores."""
    refits = [fit_tail(sample) for sample in np.random.default_rng(seed).gumbel(size=(draws, n))]
    locations, scales = np.array([f.location for f in refits]), np.array([f.scale for f in refits])
    locations.flags.writeable = scales.flags.writeable = False  # shared by every TailFits of n scores
    return locations, scales


def threshold_for_rate(good_scores: np.ndarray, false_alarm_rate: float, confidence: float | None = None) -> float:
    """The score a share `false_alarm_rate` of good images reaches or exceeds, from the fitted tail (with a
    `confidence`: the score that holds the rate with that confidence, TailFits)."""
    if confidence is None:
        return fit_tail(good_scores).quantile(false_alarm_rate)
    return TailFits(good_scores).threshold(false_alarm_rate, confidence)
