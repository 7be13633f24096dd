"""Heatmap overlays a person can look at."""
from __future__ import annotations

import cv2
import numpy as np


def heatmap_overlay(rgb: np.ndarray, anomaly_map: np.ndarray, threshold: float | None, alpha: float = 0.45) -> np.ndarray:
    """RGB crop [H, W, 3] + anomaly map [H, W] -> BGR uint8 overlay (for cv2.imwrite / JPEG).

    With a threshold, colours are comparable across images: blue is 0, red is 1.5 x threshold and
    above. Without one, each map is stretched over its own range.
    """
    if threshold:
        scaled = np.clip(anomaly_map / (1.5 * threshold), 0.0, 1.0)
    else:
        low, high = float(anomaly_map.min()), float(anomaly_map.max())
        scaled = (anomaly_map - low) / max(high - low, 1e-12)
    colours = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)
    if colours.shape[:2] != rgb.shape[:2]:
        colours = cv2.resize(colours, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
    return cv2.addWeighted(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), 1.0 - alpha, colours, alpha, 0.0)
