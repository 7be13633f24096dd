"""Image AUROC, pixel AUROC (scikit-learn) and PRO (MVTec AD definition)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(roc_auc_score(np.asarray(labels).astype(bool), np.asarray(scores)))


def _flat(arrays, dtype) -> np.ndarray:
    """An [N, H, W] array, or a list of 2-D arrays of any sizes, as one flat array."""
    if isinstance(arrays, np.ndarray):
        return arrays.astype(dtype, copy=False).ravel()
    return np.concatenate([np.asarray(a).astype(dtype, copy=False).ravel() for a in arrays])


def pixel_auroc(masks, maps) -> float:
    """AUROC over all pixels; masks and maps as [N, H, W] arrays or lists of equally shaped 2-D pairs."""
    return float(roc_auc_score(_flat(masks, bool), _flat(maps, np.float32)))


def pro_score(masks, maps, max_fpr: float = 0.3) -> float:
    """Area under the per-region-overlap curve for FPR in [0, max_fpr], divided by max_fpr.

    Regions are the 8-connected components of each image's ground-truth mask. At a threshold t,
    PRO(t) is the mean over all regions of the share of the region's pixels scoring >= t, and FPR(t)
    the share of normal pixels scoring >= t. Every distinct score is a threshold, computed in one sort.
    """
    n_regions = 0
    region_sizes = []
    labelled_parts = []
    structure = np.ones((3, 3), dtype=bool)
    for mask in masks:
        labels, count = ndimage.label(np.asarray(mask).astype(bool), structure=structure)
        labelled_parts.append(np.where(labels > 0, labels + n_regions, 0).ravel())
        if count:
            region_sizes.extend(np.bincount(labels.ravel())[1:].tolist())
            n_regions += count
    labelled = np.concatenate(labelled_parts)
    masks = labelled > 0
    maps = _flat(maps, np.float64)
    weights = np.zeros(masks.shape, dtype=np.float64)  # each region pixel weighs 1 / (n_regions * |region|)
    if n_regions == 0:
        raise ValueError("PRO needs at least one anomalous region")
    normal = ~masks
    n_normal = int(normal.sum())
    if n_normal == 0:
        raise ValueError("PRO needs normal pixels for the false-positive rate")
    sizes = np.asarray(region_sizes, dtype=np.float64)
    weights[masks] = 1.0 / (n_regions * sizes[labelled[masks] - 1])
    order = np.argsort(-maps, kind="stable")
    sorted_scores = maps[order]
    fpr = np.cumsum(normal[order]) / n_normal
    pro = np.cumsum(weights[order])
    # keep the last position of each run of equal scores: all of them pass the threshold together
    last = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    fpr = np.r_[0.0, fpr[last]]
    pro = np.r_[0.0, pro[last]]
    # integrate up to max_fpr, interpolating the crossing point
    end = np.searchsorted(fpr, max_fpr, side="right")
    x = fpr[:end]
    y = pro[:end]
    if end < len(fpr) and x[-1] < max_fpr:
        x0, x1, y0, y1 = fpr[end - 1], fpr[end], pro[end - 1], pro[end]
        y_cross = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
        x = np.r_[x, max_fpr]
        y = np.r_[y, y_cross]
    return float(np.trapezoid(y, x) / max_fpr)


def f1_optimal_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) maximising F1 of `score >= threshold` as the defect verdict."""
    precision, recall, thresholds = precision_recall_curve(np.asarray(labels).astype(bool), np.asarray(scores))
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)[:-1]
    best = int(np.argmax(f1))
    return float(thresholds[best]), float(f1[best])


def best_recall_at_rate(labels: np.ndarray, scores: np.ndarray, false_alarm_rate: float) -> float:
    """The highest share of anomalous images any threshold flags (`score >= t`) while flagging at most
    `false_alarm_rate` of the normal images: what a perfectly placed threshold with that false-alarm
    budget would catch on these scores (an upper bound for any threshold chosen without the test set)."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    good = np.sort(scores[~labels])[::-1]
    allowed = int(np.floor(false_alarm_rate * len(good) + 1e-9))  # false alarms the budget allows
    if allowed >= len(good):
        return 1.0
    # flag every score strictly above the (allowed + 1)-th highest good score: exactly `allowed` good ones pass
    return float((scores[labels] > good[allowed]).mean())
