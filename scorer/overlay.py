"""Overlays a person reads at a glance: the inspected frame beside its heatmap, the score against the
threshold written on it, and a colour scale."""
from __future__ import annotations

import cv2
import numpy as np

MAX_SIDE = 768  # long side of each panel at most (the frame's own size when smaller)
HEADER = 34
SCALE_BAR = 26


def heatmap_colours(anomaly_map: np.ndarray, threshold: float | None) -> tuple[np.ndarray, float]:
    """Map -> BGR colours and the score shown at the top of the scale. With a threshold, colours compare
    across images: blue is 0, the threshold sits at 2/3 of the scale, red is 1.5 x threshold and above."""
    top = 1.5 * threshold if threshold else max(float(anomaly_map.max()), 1e-12)
    scaled = np.clip(anomaly_map / top, 0.0, 1.0)
    return cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET), top


def heatmap_overlay(rgb: np.ndarray, anomaly_map: np.ndarray, threshold: float | None,
                    score: float | None = None, anomalous: bool | None = None, alpha: float = 0.45,
                    region: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """RGB frame [H, W, 3] + the anomaly map (any resolution) of its `region` (y0, x0, y1, x1 in frame pixels;
    default: the whole frame) -> BGR uint8 picture: the whole frame on the left, on the right the frame with
    the heatmap blended over the region (outside it dimmed: not inspected; the region outlined on both), a
    header with the verdict (the scorer's), score and threshold, a colour scale below."""
    height, width = rgb.shape[:2]
    factor = min(1.0, MAX_SIDE / max(height, width))
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    frame = cv2.cvtColor(cv2.resize(rgb, size, interpolation=cv2.INTER_AREA) if factor < 1 else rgb, cv2.COLOR_RGB2BGR)
    y0, x0, y1, x1 = (round(v * factor) for v in (region or (0, 0, height, width)))
    y1, x1 = min(max(y1, y0 + 1), size[1]), min(max(x1, x0 + 1), size[0])
    colours, top = heatmap_colours(cv2.resize(anomaly_map.astype(np.float32), (x1 - x0, y1 - y0),
                                              interpolation=cv2.INTER_LINEAR), threshold)
    blended = frame // 2
    blended[y0:y1, x0:x1] = cv2.addWeighted(frame[y0:y1, x0:x1], 1.0 - alpha, colours, alpha, 0.0)
    if (y1 - y0, x1 - x0) != frame.shape[:2]:
        for panel in (frame, blended):
            cv2.rectangle(panel, (x0, y0), (x1 - 1, y1 - 1), (255, 255, 255), 1)
    panel_w = size[0]
    canvas = np.full((HEADER + size[1] + SCALE_BAR, 2 * panel_w + 4, 3), 255, np.uint8)
    canvas[HEADER:HEADER + size[1], :panel_w] = frame
    canvas[HEADER:HEADER + size[1], panel_w + 4:] = blended
    # header: the verdict in words and numbers
    if score is not None and threshold is not None and anomalous is not None:
        bad = anomalous
        text = f"{'ANOMALOUS' if bad else 'good'}  score {score:.2f} {'>=' if bad else '<'} threshold {threshold:.2f}"
        colour = (0, 0, 200) if bad else (0, 130, 0)
    else:
        text, colour = (f"score {score:.2f} (no threshold)" if score is not None else "anomaly map"), (60, 60, 60)
    font_scale = 0.4 if canvas.shape[1] < 420 else 0.6
    cv2.putText(canvas, text, (6, HEADER - 11), cv2.FONT_HERSHEY_SIMPLEX, font_scale, colour, 1, cv2.LINE_AA)
    # colour scale under the heatmap, with 0, the threshold and the top value marked
    bar_y = HEADER + size[1] + 3
    ramp = cv2.applyColorMap(np.linspace(0, 255, panel_w).astype(np.uint8)[None, :].repeat(8, 0), cv2.COLORMAP_JET)
    canvas[bar_y:bar_y + 8, panel_w + 4:] = ramp
    small = 0.35
    cv2.putText(canvas, "0", (panel_w + 4, bar_y + 20), cv2.FONT_HERSHEY_SIMPLEX, small, (0, 0, 0), 1, cv2.LINE_AA)
    label = f"{top:.1f}+" if threshold else f"{top:.2f}"
    cv2.putText(canvas, label, (canvas.shape[1] - 8 * len(label), bar_y + 20), cv2.FONT_HERSHEY_SIMPLEX, small,
                (0, 0, 0), 1, cv2.LINE_AA)
    if threshold:
        x = panel_w + 4 + int(panel_w * threshold / top)
        cv2.line(canvas, (x, bar_y - 2), (x, bar_y + 10), (0, 0, 0), 2)
        cv2.putText(canvas, "threshold", (max(panel_w + 4, x - 30), bar_y + 20), cv2.FONT_HERSHEY_SIMPLEX, small,
                    (0, 0, 0), 1, cv2.LINE_AA)
    return canvas
