"""Evaluation on an MVTec-AD-layout category: train/good, test/<type>, ground_truth/<type>/<name>_mask.png."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from .bank import AnyBank, EnsembleBank
from .hardware import cpu_features
from .metrics import best_recall_at_rate, f1_optimal_threshold, image_auroc, pixel_auroc, pro_score
from .model import Verdicts, iter_image_batches  # Verdicts: PatchCoreScorer or scorer.ensemble.EnsembleScorer
from .preprocess import list_images
from .views import ViewConfig, frame_mask, layout

log = logging.getLogger("patchcore.scorer")


@dataclass(frozen=True)
class TestSample:
    path: Path
    defect_type: str  # "good" for normal images
    mask_path: Path | None  # None: normal (no defect pixels)

    @property
    def is_anomalous(self) -> bool:
        return self.defect_type != "good"


def train_images(category: str | Path) -> list[Path]:
    folder = Path(category) / "train" / "good"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found: expected the MVTec layout train/good")
    return list_images(folder)


def test_samples(category: str | Path) -> list[TestSample]:
    root = Path(category)
    test_root = root / "test"
    if not test_root.is_dir():
        raise FileNotFoundError(f"{test_root} not found: expected the MVTec layout test/<type>")
    samples = []
    for type_dir in sorted(p for p in test_root.iterdir() if p.is_dir()):
        for image in list_images(type_dir):
            mask = expected_mask(root, type_dir.name, image)
            samples.append(TestSample(image, type_dir.name, mask if mask.is_file() else None))
    return samples


def expected_mask(category: str | Path, defect_type: str, image: Path) -> Path:
    """Where the MVTec layout keeps a test image's ground truth: ground_truth/<type>/<stem>_mask.png."""
    return Path(category) / "ground_truth" / defect_type / f"{image.stem}_mask.png"


def load_masks(samples: list[TestSample], shapes: list[tuple[int, int]], view: ViewConfig) -> list[np.ndarray]:
    """Ground truth aligned with the view's maps: nearest-neighbour resizing of the whole frame's mask to
    the working frame (crop: then the centre crop, the paper's protocol). shapes: each image's (height, width).
    Good images: all False."""
    masks = []
    for sample, shape in zip(samples, shapes):
        shape = tuple(shape[:2])
        if sample.mask_path is None:
            masks.append(np.zeros(layout(view, *shape).work, dtype=bool))
            continue
        raw = cv2.imread(str(sample.mask_path), cv2.IMREAD_GRAYSCALE)
        if raw is None:
            raise ValueError(f"cannot read mask {sample.mask_path}")
        if raw.shape != shape:
            raise ValueError(f"mask {sample.mask_path} is {raw.shape}, its image {shape}")
        masks.append(frame_mask(raw, view))
    return masks


@dataclass(frozen=True)
class EvalReport:
    view: str  # the view and its sizes
    search: str  # the nearest-neighbour search, as it ran ("auto" resolved)
    compute: dict  # the backbone's precision and layout, as it ran (ComputeConfig, resolved, with its reason)
    cpu: dict  # the CPU's model and the flags that decide fast low precision (scorer.hardware)
    image_auroc: float
    pixel_auroc: float | None  # None when no defective test image has a ground-truth mask
    pro: float | None
    defects_without_mask: int  # defective test images left out of the pixel metrics (no ground_truth mask file)
    fit_seconds: float
    images_per_second: float
    n_test_images: int
    threshold: float | None
    # the bank's calibration: its method, target rate, confidence and the rate's 90 % interval at the threshold
    # (the last three None for an F1 threshold; the whole None for a bank without calibration; TailFits)
    threshold_calibration: dict | None
    false_alarm_rate: float | None  # share of good test images at or over the bank's threshold
    recall: float | None  # share of defective test images at or over it
    good_flagged: int  # normal test images at or above the bank's threshold (false alarms)
    defects_missed: int  # anomalous test images below it
    f1_threshold: float
    f1: float
    recall_at_f1: float  # recall at the F1-optimal threshold on these test scores (the best one could do)
    false_alarm_rate_at_f1: float  # and the false-alarm rate that threshold costs
    best_recall_at_rate: dict  # {rate: the highest recall any threshold reaches at most at that false-alarm rate}
    map_size: list  # [h, w] of the maps (and masks) the pixel metrics use
    images: list  # per test image: {"image", "type", "score"} (for re-deriving any threshold analysis)

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(scorer: Verdicts, category: str | Path, fit_seconds: float, batch_size: int = 16,
             progress: bool = True, images: list[np.ndarray] | None = None) -> EvalReport:
    """images: the test images already decoded, in test_samples order (one decoding for several scorers). Without
    them each batch is decoded just before it is scored, and not while it is: the timing is the scoring's alone, and
    memory holds one batch of frames, not the whole test set (VisA macaroni1's 200 frames: 900 MB decoded)."""
    from tqdm.auto import tqdm

    samples = test_samples(category)
    labels = np.array([s.is_anomalous for s in samples])
    # pixel metrics over the good images and the defective ones with a mask: a defect without its mask would count
    # as all-good pixels and inflate both; left out, counted and said instead
    unmasked = [s.is_anomalous and s.mask_path is None for s in samples]
    measured = sum(unmasked) < int(labels.sum())  # some defect has a mask: the pixel metrics mean something
    # without any mask no map is drawn, and no patch distance is wanted: each image's maximum alone (scorer/bounded.py)
    options = (lambda count: {}) if measured else (lambda count: {"maps": False, "grids_over": np.full(count, np.inf)})
    batches = (iter_image_batches([s.path for s in samples], batch_size, prefetch=False) if images is None else
               (images[begin:begin + batch_size] for begin in range(0, len(images), batch_size)))
    seconds, scores, maps, shapes = 0.0, [], [], []
    with tqdm(total=len(samples), desc="evaluating", unit="img", disable=not progress) as bar:
        for batch in batches:
            if not shapes:
                scorer.score(batch[:1], **options(1))  # warm-up: first-call allocations are not throughput
            started = time.perf_counter()
            result = scorer.score(batch, **options(len(batch)))
            seconds += time.perf_counter() - started
            scores.append(result.image_scores)
            maps.extend(result.maps or ())
            shapes.extend(image.shape[:2] for image in batch)
            bar.update(len(batch))
    scores_all = np.concatenate(scores)
    pixel = [i for i, left_out in enumerate(unmasked) if not left_out]
    if len(pixel) < len(samples):
        first = samples[unmasked.index(True)]
        log.warning("defective test images without a ground-truth mask are left out of pixel AUROC and PRO",
                    extra={"fields": {"count": sum(unmasked), "first": str(first.path),
                                      "expected": str(expected_mask(category, first.defect_type, first.path))}})
    masks = load_masks([samples[i] for i in pixel], [shapes[i] for i in pixel], scorer.view) if measured else []
    pixel_maps = [maps[i] for i in pixel] if measured else []
    threshold = scorer.threshold
    flagged = scorer.verdict(scores_all)
    f1_threshold, f1 = f1_optimal_threshold(labels, scores_all)
    return EvalReport(
        view=scorer.view.describe(),
        search=scorer.index.search_config.describe(),
        compute=scorer.extractor.compute.to_dict(),
        cpu=cpu_features().to_dict(),
        image_auroc=image_auroc(labels, scores_all),
        pixel_auroc=pixel_auroc(masks, pixel_maps) if measured else None,
        pro=pro_score(masks, pixel_maps) if measured else None,
        defects_without_mask=sum(unmasked),
        fit_seconds=round(fit_seconds, 2),
        images_per_second=round(len(samples) / seconds, 2),
        n_test_images=len(samples),
        threshold=threshold,
        threshold_calibration=threshold_calibration(scorer),
        false_alarm_rate=float(flagged[~labels].mean()) if threshold is not None else None,
        recall=float(flagged[labels].mean()) if threshold is not None else None,
        good_flagged=int((flagged & ~labels).sum()) if threshold is not None else -1,
        defects_missed=int((~flagged & labels).sum()) if threshold is not None else -1,
        f1_threshold=f1_threshold,
        f1=f1,
        recall_at_f1=float((scores_all[labels] >= f1_threshold).mean()),
        false_alarm_rate_at_f1=float((scores_all[~labels] >= f1_threshold).mean()),
        best_recall_at_rate={str(rate): best_recall_at_rate(labels, scores_all, rate)
                             for rate in sorted({0.01, 0.05, *scorer_rate(scorer)})},
        map_size=list(layout(scorer.view, *shapes[0]).work),
        images=[{"image": str(s.path.relative_to(Path(category))), "type": s.defect_type, "score": float(v)}
                for s, v in zip(samples, scores_all)],
    )


def threshold_calibration(scorer: Verdicts) -> dict | None:
    """How the bank's threshold was set, for eval's report: method, target rate, confidence, the rate's interval."""
    calibration = scorer.bank.calibration
    if calibration is None:
        return None
    return {"method": calibration.method, "target_rate": calibration.false_alarm_rate,
            "confidence": calibration.confidence,
            "rate_interval": None if calibration.rate_interval is None else list(calibration.rate_interval)}


def scorer_rate(scorer: Verdicts) -> list[float]:
    """The bank's target false-alarm rate, when its threshold was calibrated for one."""
    calibration = scorer.bank.calibration
    return [calibration.false_alarm_rate] if calibration and calibration.false_alarm_rate else []


def labelled_scores(scorer: Verdicts, category: str | Path, batch_size: int = 16,
                    progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(labels, image scores) of a category's test images, for F1 calibration."""
    samples = test_samples(category)
    result = scorer.score_paths([s.path for s in samples], batch_size, maps=False, progress=progress)
    return np.array([s.is_anomalous for s in samples]), result.image_scores


def bank_summary(bank: AnyBank) -> dict:
    if isinstance(bank, EnsembleBank):
        return {"backbone": bank.backbone, "view": bank.view.relevant(), "bank_size": bank.size,
                "roi": list(bank.roi.shape) if bank.roi is not None else None,
                "ensemble": {"combine": bank.combine, "normalisation": [list(n) for n in bank.normalisation]},
                "members": [bank_summary(member) for member in bank.members],
                "threshold": bank.calibration.threshold if bank.calibration else None,
                "calibration": bank.calibration.to_dict() if bank.calibration else None, "info": bank.info}
    return {"features": bank.feature_config.to_dict(), "view": bank.view.relevant(), "bank_size": int(len(bank.features)),
            "roi": list(bank.roi.shape) if bank.roi is not None else None,
            "position_norm": bank.position.settings() if bank.position is not None else None,
            "coreset": vars(bank.coreset), "reweight_neighbours": bank.reweight_neighbours,
            "threshold": bank.calibration.threshold if bank.calibration else None,
            "calibration": bank.calibration.to_dict() if bank.calibration else None, "info": bank.info}
