"""PatchCore (Roth et al., CVPR 2022): backbone, patch features, coreset, index, scores, maps, banks, metrics.

Pure compute: nothing here knows about Redis or the streaming service.
"""
from .numba_cache import ensure_numba_cache_dir

ensure_numba_cache_dir()  # before any numba-compiled module is imported
from .backbones import BACKBONES, BackboneError, load_backbone
from .bank import BankError, Calibration, MemoryBank, bank_from_bytes, bank_to_bytes, load_bank, save_bank
from .calibration import CalibrationConfig
from .config import BuildConfig, CoresetConfig, FeatureConfig
from .index import SearchConfig
from .model import PatchCoreScorer, ScoreResult, build_bank, resolve_device, update_bank
from .preprocess import ImageDecodeError, decode_image, load_image, to_rgb
from .views import Region, ViewConfig, ViewError

__all__ = [
    "BACKBONES", "BackboneError", "BankError", "BuildConfig", "Calibration", "CalibrationConfig", "CoresetConfig",
    "FeatureConfig", "Region", "SearchConfig", "ViewConfig", "ViewError", "update_bank",
    "ImageDecodeError", "MemoryBank", "PatchCoreScorer", "ScoreResult", "bank_from_bytes", "bank_to_bytes",
    "build_bank", "decode_image", "load_backbone", "load_bank", "load_image", "resolve_device", "save_bank", "to_rgb",
]
