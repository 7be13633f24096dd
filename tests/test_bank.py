"""Bank files: round trip, checksum, truncation, mismatch refusal, no code execution."""
import json

import numpy as np
import pytest

from scorer import BankError, Calibration, MemoryBank, PatchCoreScorer, bank_from_bytes, bank_to_bytes, load_bank, save_bank
from scorer.config import CoresetConfig, FeatureConfig
from scorer.model import build_extractor


# the bytes of pickle.dumps({}) (protocol 4): a pickle must be refused, never unpickled
PICKLED_DICT = b"\x80\x04\x95\x04\x00\x00\x00\x00\x00\x00\x00}\x94."


def small_bank(config: FeatureConfig | None = None) -> MemoryBank:
    config = config or FeatureConfig(backbone="mobilenet_v2", layers=("features.6", "features.13"),
                                     weights_sha256="ab" * 32)
    rng = np.random.default_rng(0)
    return MemoryBank(rng.normal(size=(50, 8)).astype(np.float32), config, CoresetConfig(fraction=0.25, seed=4),
                      Calibration(threshold=1.5, method="good-sigma", good_scores=(1.0, 1.1)), 9,
                      {"n_train_images": 3})


def test_round_trip(tmp_path):
    bank = small_bank()
    save_bank(bank, tmp_path / "a.bank")
    loaded = load_bank(tmp_path / "a.bank")
    np.testing.assert_array_equal(loaded.features, bank.features)
    assert loaded.feature_config == bank.feature_config
    assert loaded.coreset == bank.coreset and loaded.calibration == bank.calibration
    assert loaded.info == bank.info


def test_any_flipped_byte_is_refused():
    data = bytearray(bank_to_bytes(small_bank()))
    for position in (len(data) - 5, len(data) // 2, 60):
        corrupt = bytearray(data)
        corrupt[position] ^= 0x01
        with pytest.raises(BankError):
            bank_from_bytes(bytes(corrupt))


def test_truncated_and_oversize_and_foreign_files_are_refused(tmp_path):
    data = bank_to_bytes(small_bank())
    with pytest.raises(BankError, match="truncated or corrupt"):
        bank_from_bytes(data[: len(data) // 2])
    with pytest.raises(BankError, match="limit"):
        bank_from_bytes(data, max_bytes=100)
    with pytest.raises(BankError):
        bank_from_bytes(PICKLED_DICT)
    header = json.dumps({"__metadata__": {"settings": "{}"}, "features": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    with pytest.raises(BankError, match="checksum"):
        bank_from_bytes(len(header).to_bytes(8, "little") + header + b"\0\0\0\0")


def test_bank_for_another_backbone_or_weights_is_refused(mobilenet):
    extractor, config = build_extractor(FeatureConfig(backbone="mobilenet_v2"))
    rng = np.random.default_rng(0)
    wrong_weights = MemoryBank(rng.normal(size=(10, 1024)).astype(np.float32),
                               FeatureConfig(backbone="mobilenet_v2", layers=config.layers, weights_sha256="0" * 64),
                               CoresetConfig())
    with pytest.raises(BankError, match="weights_sha256"):
        PatchCoreScorer(wrong_weights, device="cpu")
    other_layers = MemoryBank(wrong_weights.features, FeatureConfig(backbone="mobilenet_v2", layers=("features.3",),
                                                                    weights_sha256=config.weights_sha256), CoresetConfig())
    with pytest.raises(BankError, match="layers"):  # a shared extractor of other taps
        PatchCoreScorer(other_layers, device="cpu", extractor=extractor)
    wrong_dim = MemoryBank(wrong_weights.features[:, :100].copy(), config, CoresetConfig())
    with pytest.raises(BankError, match="shape"):
        PatchCoreScorer(wrong_dim, device="cpu", extractor=extractor)
    matching = MemoryBank(wrong_weights.features, config, CoresetConfig())
    assert PatchCoreScorer(matching, device="cpu").config == config


def test_view_and_region_of_interest_round_trip(tmp_path):
    from dataclasses import replace

    from scorer.views import ViewConfig

    roi = np.zeros((10, 16), bool)
    roi[2:8, 3:12] = True
    bank = replace(small_bank(), view=ViewConfig("tiles", scale=0.3, tile=160, overlap=0.5), roi=roi)
    save_bank(bank, tmp_path / "t.bank")
    loaded = load_bank(tmp_path / "t.bank")
    assert loaded.view == bank.view
    np.testing.assert_array_equal(loaded.roi, roi)
    data = bytearray(bank_to_bytes(bank))
    data[-3] ^= 0x01  # the ROI tensor is covered by the checksum too
    with pytest.raises(BankError):
        bank_from_bytes(bytes(data))


def test_format_1_files_read_as_the_crop_view():
    """Banks written before views existed kept resize/crop in the feature settings."""
    import hashlib

    from safetensors.numpy import save as st_save

    bank = small_bank()
    settings = bank.metadata()
    settings["format_version"] = 1
    settings.pop("view")
    settings["features"] = {**settings["features"], "resize": 288, "crop": 256}
    settings["calibration"] = {"threshold": 2.0, "method": "good-sigma", "good_scores": [1.0], "sigmas": 3.0, "f1": None}
    text = json.dumps(settings, sort_keys=True)
    features = np.ascontiguousarray(bank.features, dtype="<f4")
    digest = hashlib.sha256(text.encode())
    digest.update(features.tobytes())
    loaded = bank_from_bytes(st_save({"features": features}, metadata={"settings": text, "sha256": digest.hexdigest()}))
    assert loaded.view.kind == "crop" and (loaded.view.resize, loaded.view.crop) == (288, 256)
    assert loaded.calibration.threshold == 2.0 and loaded.calibration.method == "good-sigma"
    assert loaded.feature_config == bank.feature_config
