"""Where numba keeps its compiled-function cache (`cache=True`).

numba raises at import time when it finds no writable cache location: not NUMBA_CACHE_DIR, not a
`__pycache__` beside the source (read-only site-packages), not ~/.cache (HOME=/ for a user without a
home, as in the container). Then the cache goes to a private temporary directory instead: one this
user owns and nobody else can write (numba's cache files are pickles), else a fresh one per process.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
        return True
    except OSError:
        return False


def _private(folder: Path) -> bool:
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.lstat()
    except OSError:
        return False
    return folder.is_dir() and not folder.is_symlink() and info.st_uid == os.getuid() and not info.st_mode & 0o022


def ensure_numba_cache_dir() -> Path | None:
    """Point NUMBA_CACHE_DIR at a writable folder if numba would find none; returns the folder it set, if any."""
    configured = os.environ.get("NUMBA_CACHE_DIR")
    places = [Path(configured)] if configured else []
    places += [Path(__file__).parent / "__pycache__", Path.home() / ".cache" / "numba"]
    if any(_writable(place) for place in places):
        return None
    fallback = Path(tempfile.gettempdir()) / f"patchcore-numba-{os.getuid()}"
    if not _private(fallback):
        try:
            fallback = Path(tempfile.mkdtemp(prefix="patchcore-numba-"))
        except OSError:
            return None  # nowhere to write: numba's own error says so
    os.environ["NUMBA_CACHE_DIR"] = str(fallback)
    if "numba" in sys.modules:  # numba reads its settings when first imported
        from numba.core import config

        config.reload_config()
    return fallback
