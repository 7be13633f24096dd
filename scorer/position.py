"""Per-position normalisation of patch scores: for fixtured parts, each feature-map position measured against
what good images give at that same position.

A fixtured part lies in the same place in every frame, so each position of the feature grid sees the same piece
of the part: its edge, a hole, a flat face. Plain PatchCore compares a patch distance with one threshold for the
whole frame, so a position whose good patches are naturally far from the bank (a glint, a rim that varies) sets
the bar for all of them, and a small defect on a quiet face stays under it. Normalised, a patch score is
z = (d - mean_p) / scale_p: how many of its own position's good-image standard deviations a patch lies above
that position's good-image mean. The image score is then Eq. 7 on the highest z (as on the highest distance
without it), maps are z maps, and the bank's threshold is in z units.

The statistics come from held-out distances: each training image's patches against the coreset the build would
have made without it (scorer/heldout.py, what the shipped bank gives an unseen good image), their mean and
standard deviation per position over the training images. A position's scale is floored at SCALE_FLOOR times
the median position's, so that a position where every good image happens to agree exactly cannot blow up a
tiny difference. Positions no training image covered (outside the bank's region of interest, which a camera's
own region may include) take the median position's mean and scale.

Must not be used where the part moves: unfixtured parts, parts that rotate or shift by more than a patch
(8 pixels of the working frame at stride 8), changing zoom or camera pose. There a position sees different
pieces of the part from frame to frame, the statistics describe a blur of them, and the scores are worse than
without the normalisation. The statistics belong to one window layout (frame size under the full and tiles views):
a frame of another is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

SCALE_FLOOR = 0.1  # a position's scale is at least this share of the median position's
STATISTIC = "leave-out mean/std"  # how the statistics were computed (recorded in the bank)
SETTINGS_KEYS = {"grid", "window", "floor", "images", "statistic"}  # a bank's position settings: exactly these


class PositionError(ValueError):
    """Position statistics that cannot be computed or do not fit (too few images, mixed layouts, bad values)."""


@dataclass(frozen=True, eq=False)
class PositionNorm:
    """Good-image patch-score statistics per position of one window layout: `mean` and `scale` [T, gh, gw]
    float32 (T windows of gh x gw patches; scale > 0), for windows of `window` = (h, w) pixels."""

    mean: np.ndarray
    scale: np.ndarray
    window: tuple[int, int]
    floor: float = SCALE_FLOOR
    images: int = 0  # training images the statistics come from

    def __post_init__(self) -> None:
        if self.mean.ndim != 3 or self.mean.shape != self.scale.shape:
            raise PositionError(f"position mean {self.mean.shape} and scale {self.scale.shape} must be equal [T, gh, gw]")
        if not (np.all(np.isfinite(self.mean)) and np.all(np.isfinite(self.scale)) and np.all(self.scale > 0)):
            raise PositionError("position statistics must be finite with positive scales")
        if len(self.window) != 2 or min(self.window) < 1:
            raise PositionError(f"position window must be (h, w) >= 1, got {self.window}")

    @property
    def grid(self) -> tuple[int, int, int]:
        """(T, gh, gw): windows and patch grid the statistics belong to."""
        return tuple(int(n) for n in self.mean.shape)

    def settings(self) -> dict[str, Any]:
        """What a bank stores beside the tensors (and checks on load)."""
        return {"grid": list(self.grid), "window": list(self.window), "floor": self.floor, "images": self.images,
                "statistic": STATISTIC}

    @classmethod
    def from_parts(cls, settings: dict[str, Any], mean: np.ndarray, scale: np.ndarray) -> "PositionNorm":
        """A bank's stored settings and tensors, read strictly: exactly the known keys, tensors of the stated grid."""
        if not isinstance(settings, dict) or set(settings) != SETTINGS_KEYS:
            raise PositionError(f"position settings must have exactly {sorted(SETTINGS_KEYS)}")
        if settings["statistic"] != STATISTIC:
            raise PositionError(f"unknown position statistic {settings['statistic']!r} (known: {STATISTIC!r})")
        if list(mean.shape) != list(settings["grid"]):
            raise PositionError(f"position tensors are {list(mean.shape)}, the settings say {settings['grid']}")
        return cls(mean.astype(np.float32), scale.astype(np.float32), tuple(int(v) for v in settings["window"]),
                   float(settings["floor"]), int(settings["images"]))

    def mismatch(self, n_windows: int, window: tuple[int, int]) -> str | None:
        """Why frames cut into `n_windows` windows of `window` pixels cannot be scored (None: they can)."""
        if n_windows != self.grid[0] or tuple(window) != tuple(self.window):
            return (f"the bank's per-position statistics belong to {self.grid[0]} window(s) of {self.window[0]}x"
                    f"{self.window[1]} pixels, this frame gives {n_windows} of {window[0]}x{window[1]}: "
                    f"score frames of the training images' size, or rebuild without --position-norm")
        return None


def _floored(std: np.ndarray, floor: float) -> tuple[np.ndarray, float]:
    """Scales with the floor applied, and the floor's absolute value (floor x the median position's std)."""
    least = floor * float(np.median(std))
    if not least > 0:
        raise PositionError("good images' patch distances do not vary at all: nothing to normalise by")
    return np.maximum(std, least), least


def position_norm(distances: np.ndarray, positions: np.ndarray, grid: tuple[int, int, int],
                  window: tuple[int, int], floor: float = SCALE_FLOOR) -> PositionNorm:
    """Statistics of held-out patch distances `distances` [N, P] (image i's patch j at flat position
    `positions[j]` of the [T, gh, gw] `grid`): per position the mean and the floored population std over the
    N images; positions not in `positions` take the median position's."""
    distances = np.asarray(distances, dtype=np.float64)
    if distances.ndim != 2 or len(distances) < 3:
        raise PositionError(f"per-position statistics need at least 3 training images, got {len(distances)}")
    if distances.shape[1] != len(positions):
        raise PositionError(f"{distances.shape[1]} patches per image for {len(positions)} positions")
    mean_p, std_p = distances.mean(axis=0), distances.std(axis=0)
    std_p, _ = _floored(std_p, floor)
    size = int(np.prod(grid))
    mean = np.full(size, np.median(mean_p))
    scale = np.full(size, np.median(std_p))
    mean[positions], scale[positions] = mean_p, std_p
    return PositionNorm(mean.reshape(grid).astype(np.float32), scale.reshape(grid).astype(np.float32),
                        tuple(int(v) for v in window), floor, len(distances))


def leave_one_out_z(distances: np.ndarray, floor: float = SCALE_FLOOR) -> np.ndarray:
    """Each training image's held-out distances [N, P] normalised by the statistics of the other N - 1 images
    (its own distances left out of its position's mean and std, as an unseen image's are), floored at the
    same absolute value as the bank's scales. For the threshold's good scores. [N, P] float64."""
    d = np.asarray(distances, dtype=np.float64)
    n = len(d)
    if n < 3:
        raise PositionError(f"per-position statistics need at least 3 training images, got {n}")
    total, squares = d.sum(axis=0), (d * d).sum(axis=0)
    mean = (total[None] - d) / (n - 1)
    variance = np.maximum((squares[None] - d * d) / (n - 1) - mean * mean, 0.0)
    _, least = _floored(d.std(axis=0), floor)
    return (d - mean) / np.maximum(np.sqrt(variance), least)
