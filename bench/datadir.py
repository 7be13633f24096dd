"""Where the bench scripts find their data sets: `--data DIR`, else `$PATCHCORE_DATA`, else the shared folder
beside the checkout (../shared/datasets) when it exists. Absent data is a clear error, never a silent skip."""
from __future__ import annotations

import os
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
ENVIRONMENT = "PATCHCORE_DATA"


class DataMissing(SystemExit):
    """The data a bench needs is not there (a SystemExit: the bench stops with the message, no traceback)."""


def data_root(given: str | None = None) -> Path:
    """The folder that holds the data sets (mvtec_bottle, visa_macaroni1, ...)."""
    for origin, value in (("--data", given), (f"${ENVIRONMENT}", os.environ.get(ENVIRONMENT))):
        if value:
            root = Path(value).expanduser()
            if not root.is_dir():
                raise DataMissing(f"error: {origin} {root} is not a folder")
            return root
    if SHARED.is_dir():
        return SHARED
    raise DataMissing(f"error: no data sets: pass --data DIR or set ${ENVIRONMENT} "
                      f"(the default, {SHARED}, does not exist)")


def category(name_or_path: str, given_root: str | None = None) -> Path:
    """A data set folder: a path as given when it exists, else a name under the data root (`mvtec_bottle`)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or len(path.parts) > 1:
        raise DataMissing(f"error: data set {path} is not a folder")
    folder = data_root(given_root) / name_or_path
    if not folder.is_dir():
        raise DataMissing(f"error: data set {name_or_path!r} is not in {folder.parent}")
    return folder


def add_data_argument(parser) -> None:
    """The `--data DIR` option every bench that reads data sets takes."""
    parser.add_argument("--data", default=None,
                        help=f"folder of the data sets (default: ${ENVIRONMENT}, else {SHARED} when present)")
