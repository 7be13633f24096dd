"""Overlays a person reads at a glance: the whole frame beside the heatmap of the part the view inspects
(outlined; outside it dimmed), the verdict with score and threshold in the header, a colour scale; at least
512 px on the long side when the frame has them."""
import numpy as np

from scorer.overlay import HEADER, SCALE_BAR, heatmap_overlay
from scorer.views import ViewConfig, inspected_box


def panels(picture):
    width = (picture.shape[1] - 4) // 2
    body = picture[HEADER:picture.shape[0] - SCALE_BAR]
    return body[:, :width], body[:, width + 4:]


def test_the_whole_frame_beside_the_heatmap_of_the_centre_crop():
    frame = np.full((1000, 1500, 3), 200, np.uint8)
    box = inspected_box(1000, 1500, ViewConfig("crop"))  # the centre crop's footprint in the frame
    assert box == (62, 312, 938, 1188)
    anomaly_map = np.zeros((224, 224), np.float32)
    anomaly_map[100:124, 100:124] = 30.0  # a defect in the middle of the crop, 3 x the threshold
    picture = heatmap_overlay(frame, anomaly_map, threshold=10.0, score=30.0, anomalous=True, region=box)
    left, right = panels(picture)
    assert left.shape[:2] == right.shape[:2] == (512, 768)  # the whole 3:2 frame, 768 px on the long side
    assert (left[10:30, 10:30] == 200).all()  # the frame as it is
    assert (right[10:30, 10:30] == 100).all()  # outside the inspected region: dimmed
    b, g, r = (int(v) for v in right[256, 384])  # the defect: red
    assert r > b + 40 and r > g + 40
    b, g, r = (int(v) for v in right[100, 250])  # inside the region, nothing wrong: blue
    assert b > r + 50
    header = picture[:HEADER].reshape(-1, 3).astype(int)
    assert ((header[:, 2] - header[:, 1] > 80)).sum() > 50  # the verdict written in red: ANOMALOUS


def test_a_good_frame_in_the_full_view_is_written_green_and_fills_both_panels():
    frame = np.full((240, 320, 3), 90, np.uint8)
    picture = heatmap_overlay(frame, np.ones((8, 10), np.float32), threshold=10.0, score=1.0, anomalous=False)
    left, right = panels(picture)
    assert picture.shape[1] == 2 * 320 + 4 and left.shape[:2] == (240, 320)  # the frame's own size (< 512)
    assert not (right == left // 2).all()  # the heatmap covers the whole frame, nothing dimmed
    header = picture[:HEADER].reshape(-1, 3).astype(int)
    assert ((header[:, 1] - header[:, 2] > 60)).sum() > 50 and not ((header[:, 2] - header[:, 1] > 80)).any()
