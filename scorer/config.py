"""Settings that define a memory bank. A bank stores them, and a scorer refuses a mismatch."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .calibration import CalibrationConfig
from .views import ViewConfig


AUTO_BACKBONE = "auto"  # resolved when features are built: scorer.backbones.resolve_backbone
# What "auto" picks: the first whose ImageNet weights are present. wide_resnet50_2 is the paper's; without it,
# efficientnet_lite2, whose weights are a package dependency (present on every install) and which measured best
# of the offline backbones and ensembles on macaroni1 and bottle (the table and its reading: docs/scorer.md,
# "Backbones and ensembles (eval)"); then Lite0 and mobilenet_v2.
AUTO_PREFERENCE = ("wide_resnet50_2", "efficientnet_lite2", "efficientnet_lite0", "mobilenet_v2")
# FeatureConfig.layers == (FINE_TAPS,): the backbone's finer taps (BackboneSpec.fine_layers: the stride-4 stage's
# end beside the default two), for defects of a few pixels; a build then selects CoresetConfig.fraction *
# FINE_CORESET_SCALE of the patches: the stride-4 grid holds 4x the patches, so the bank keeps the size the default
# taps give at the same --coreset (docs/scorer.md, "Finer detail for small defects")
FINE_TAPS = "fine"
FINE_CORESET_SCALE = 0.25
COMBINES = ("mean", "max")  # how an ensemble's normalised member scores combine (scorer/ensemble.py)


@dataclass(frozen=True)
class FeatureConfig:
    """Everything that determines a patch feature vector."""

    backbone: str = field(default=AUTO_BACKBONE, metadata={  # a bank always stores the resolved name
        "help": f"auto (the first of {', '.join(AUTO_PREFERENCE)} whose weights are present: the paper's "
                "wide_resnet50_2 where it is; `patchcore weights list`), wide_resnet50_2, resnet18, resnet50, "
                "mobilenet_v2, efficientnet_lite0, efficientnet_lite1, efficientnet_lite2, or an ensemble of several "
                "joined by + "
                "(mobilenet_v2+efficientnet_lite0)."})
    layers: tuple[str, ...] = ()  # empty: the backbone's default taps
    weights_sha256: str = ""  # filled in from the weights actually loaded
    patch_size: int = 3
    pretrain_dim: int = 1024
    target_dim: int = 1024

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FeatureConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["layers"] = tuple(values.get("layers", ()))
        return cls(**values)

    def differences(self, other: "FeatureConfig") -> list[str]:
        """Human-readable list of fields where two configs disagree."""
        return [
            f"{f.name}: bank has {getattr(self, f.name)!r}, scorer has {getattr(other, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


@dataclass(frozen=True)
class CoresetConfig:
    fraction: float = field(default=0.1, metadata={"help": "Coreset fraction of all training patches (0.01-0.25 typical)."})
    projection_dim: int = 128
    start_points: int = 10
    seed: int = field(default=0, metadata={"help": "Seed of the coreset and the calibration split."})


@dataclass(frozen=True)
class BuildConfig:
    features: FeatureConfig = field(default_factory=FeatureConfig)
    view: ViewConfig = field(default_factory=ViewConfig)
    coreset: CoresetConfig = field(default_factory=CoresetConfig)
    # threshold from good images only: k-fold scores of every training image, Gumbel tail at a target rate
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    # b of the paper's Eq. 7; 1 means plain max of the patch scores
    reweight_neighbours: int = field(default=9, metadata={"min": 1, "help": "b of the paper's Eq. 7 reweighting; 1 = plain max patch score."})
    batch_size: int = field(default=16, metadata={"min": 1, "help": "Images per backbone pass."})
    # an ensemble bank (backbone "a+b"): members' scores, each normalised by its own held-out good scores,
    # combined by this (scorer/ensemble.py)
    combine: str = field(default="mean", metadata={
        "help": "Ensembles (--backbone a+b): combine the members' normalised scores and maps by mean or max."})
    # per-position statistics of good patch scores in the bank, patch scores normalised by them (scorer/position.py)
    position_norm: bool = field(default=False, metadata={
        "help": "Fixtured parts only: normalise each patch score by the good images' statistics at its position "
                "(threshold in z units); never for parts that move, rotate or change scale (docs/scorer.md)."})

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.reweight_neighbours < 1:
            raise ValueError(f"batch_size and reweight_neighbours must be at least 1, not {self.batch_size} and "
                             f"{self.reweight_neighbours}")
        if self.combine not in COMBINES:
            raise ValueError(f"unknown combination {self.combine!r}; choose from {', '.join(COMBINES)}")
        if self.position_norm and self.calibration.folds and self.calibration.method != "leave-out":
            raise ValueError("--position-norm calibrates from leave-out scores: it cannot use the kfold method")
