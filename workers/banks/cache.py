"""The worker's scorers, one per bank name, following the registry's active version between batches."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import torch

from runtime.metrics import BANK_VERSION
from workers.banks.registry import BankRegistry, RegistryError
from scorer import BackboneError, BankError, FeatureConfig, PatchCoreScorer, bank_from_bytes, resolve_device
from scorer.ensemble import EnsembleScorer, scorer_for
from scorer.features import PatchFeatureExtractor
from scorer.features import ComputeConfig
from scorer.index import IndexError_, SearchConfig
from scorer.model import build_extractor

log = logging.getLogger("patchcore.worker")


@dataclass
class ActiveScorer:
    name: str
    version: int
    scorer: PatchCoreScorer | EnsembleScorer


class BankCache:
    """Loads banks from the registry; a bank that fails to load never replaces the one serving."""

    def __init__(self, registry: BankRegistry, device: str = "auto", index: str = "auto",
                 weights: str | None = None, compute: ComputeConfig = ComputeConfig(), max_bank_bytes: int = 2 << 30,
                 search: SearchConfig = SearchConfig()):
        self.registry = registry
        self.device = device
        self.index = index
        self.search = search
        self.weights = weights
        self.compute = compute
        self.max_bank_bytes = max_bank_bytes
        self.host_retry_s = 10.0
        self._scorers: dict[str, ActiveScorer] = {}
        self._extractors: dict = {}  # one backbone per feature config, shared by banks and versions
        self._refused: set[tuple[str, int]] = set()
        if not registry.verifies:
            log.warning("no bank signing key: banks are loaded unsigned (checked against their sha256 only)")
        self._retry_after: dict[tuple[str, int], float] = {}  # host faults (weights, memory): try again later
        self._errors: dict[str, tuple[str, bool]] = {}  # why a bank has no scorer, and whether this host is why

    def _extractor(self, config: FeatureConfig) -> PatchFeatureExtractor:
        """The backbone of a bank's (or ensemble member's) feature settings, shared by banks and versions."""
        extractor = self._extractors.get(config)
        if extractor is None:
            extractor, actual = build_extractor(replace(config, weights_sha256=""), self.weights,
                                                resolve_device(self.device), self.compute)
            self._extractors[actual] = extractor
        return extractor

    def _drop_unused_extractors(self) -> None:
        """Forget the backbones no serving scorer runs (a bank switched to a version of other feature settings):
        their weights and ONNX graphs go with them (scorer.features lends a graph only while an extractor holds it)."""
        used = {id(member.extractor) for active in self._scorers.values() for member in _members(active.scorer)}
        self._extractors = {config: e for config, e in self._extractors.items() if id(e) in used}

    def why(self, name: str) -> tuple[str, bool]:
        """Why bank `name` has no scorer here, and whether the cause is this host (weights, memory)
        rather than the registry (no active version, a refused one)."""
        return self._errors.get(name, ("no active version in the registry", False))

    def loaded(self) -> dict[str, int]:
        """The versions serving now, by bank name."""
        return {name: active.version for name, active in list(self._scorers.items())}  # read by /readyz's thread

    def preload(self) -> None:
        """Load (or switch to) the active version of every bank in the registry."""
        for name in self.registry.names():
            self.get(name)

    def get(self, name: str) -> ActiveScorer | None:
        """The scorer of bank `name`'s active version (switching if it changed), or None if none can serve."""
        version = self.registry.active(name)
        current = self._scorers.get(name)
        if version is None:
            self._errors.pop(name, None)
        if version is None or (current is not None and current.version == version):
            return current
        if (name, version) in self._refused or time.monotonic() < self._retry_after.get((name, version), 0.0):
            return current
        try:
            bank = bank_from_bytes(self.registry.fetch(name, version), self.max_bank_bytes)
            # refuses (BankError) a bank whose settings or weights differ from the extractor's; an ensemble
            # gets one extractor per member (BackboneError: a member whose weights this host lacks)
            scorer = scorer_for(bank, device=self.device, index=self.index, search=self.search,
                                extractor_for=self._extractor)
            scorer.warm_up()  # the backbone's first-batch cost (an ONNX export) paid here, not on a frame
        # this host, not the bank (IndexError_: a search this host cannot run, e.g. without faiss)
        except (BackboneError, IndexError_, OSError, MemoryError, torch.cuda.OutOfMemoryError) as exc:
            self._retry_after[(name, version)] = time.monotonic() + self.host_retry_s
            self._errors[name] = (f"v{version} cannot load on this host: {exc}", True)
            log.error("bank cannot load on this host; retrying later",
                      extra={"fields": {"bank": name, "version": version, "error": str(exc), "retry_in_s": self.host_retry_s}})
            return current
        except (RegistryError, BankError) as exc:
            self._refused.add((name, version))
            self._errors[name] = (f"v{version} refused: {exc}", False)
            log.error("bank refused; the active one keeps serving",
                      extra={"fields": {"bank": name, "version": version, "error": str(exc),
                                        "serving": current.version if current else None}})
            return current
        self._scorers[name] = ActiveScorer(name, version, scorer)
        self._drop_unused_extractors()
        BANK_VERSION.labels(name).set(version)
        log.info("bank loaded", extra={"fields": {"bank": name, "version": version}})
        return self._scorers[name]


def _members(scorer: PatchCoreScorer | EnsembleScorer) -> list[PatchCoreScorer]:
    """The single-bank scorers that make up `scorer` (itself, or an ensemble's members)."""
    return list(scorer.members) if isinstance(scorer, EnsembleScorer) else [scorer]
