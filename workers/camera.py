"""A camera's settings (contracts/control.py) as the scorer takes them: its region of interest as a scorer Region
(the polygon filled at the frame's size, cached per camera, settings version and frame size) and its threshold.
Shared by the worker and `patchcore score`, so streamed verdicts and offline ones apply the same settings."""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np

from contracts.control import CameraSettings
from scorer import Region


class CameraRegions:
    """Regions of interest of cameras' settings, built once per (camera, version, frame size) and kept (bounded)."""

    max_kept = 256

    def __init__(self) -> None:
        self._kept: OrderedDict[tuple, Region] = OrderedDict()

    def region(self, settings: CameraSettings | None, height: int, width: int) -> Region | None:
        """The camera's Region for a height x width frame (None: no settings or no ROI: the bank's applies)."""
        if settings is None or not settings.has_roi:
            return None
        size = (height, width) if settings.roi_polygon is not None else None  # a mask is stretched: any size
        key = ("camera", settings.camera, settings.version, size)
        region = self._kept.get(key)
        if region is None:
            region = Region(key, settings.roi(height, width))
            self._kept[key] = region
            if len(self._kept) > self.max_kept:
                self._kept.popitem(last=False)
        return region


def thresholds(settings: Sequence[CameraSettings | None], bank_threshold: float | None) -> np.ndarray | None:
    """Each image's threshold [B] (NaN: none) under its camera's settings; None when no image has settings (the
    bank's threshold decides them all)."""
    if all(s is None for s in settings):
        return None
    values = [bank_threshold if s is None else s.effective_threshold(bank_threshold) for s in settings]
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)
