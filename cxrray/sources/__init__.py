"""Source adapters: each turns one dataset layout into a manifest (see cxrray.manifest).

    load_source("chexpert", "/data/CheXpert-v1.0-small", labels="chexpert5", check_files=False)

Every adapter returns SourceResult(manifest, label_space, skipped, info); info["summary"]
is a one-line account (images, patients, splits, skipped rows by reason).
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

from cxrray.manifest import ManifestError, SourceResult
from cxrray.sources.chexpert import load_chexpert
from cxrray.sources.dicom import load_dicom
from cxrray.sources.generic import load_csv, load_folder
from cxrray.sources.kermany import load_kermany
from cxrray.sources.nih import load_nih

SOURCES: tuple[str, ...] = ("chexpert", "synthetic", "nih", "kermany", "csv", "folder", "dicom")


def _load_synthetic(root: str | Path, **options) -> SourceResult:
    # The generator writes the CheXpert layout; by default train on the findings it draws.
    options.setdefault("labels", "synthetic")
    result = load_chexpert(root, **options)
    result.info["source"] = "synthetic"
    result.info["summary"] = "synthetic" + result.info["summary"].removeprefix("chexpert")
    return result


_LOADERS: dict[str, Callable[..., SourceResult]] = {
    "chexpert": load_chexpert,
    "synthetic": _load_synthetic,
    "nih": load_nih,
    "kermany": load_kermany,
    "csv": load_csv,  # root is the CSV file
    "folder": load_folder,
    "dicom": load_dicom,  # a DICOM folder tree, headers only
}


def load_source(source: str, root: str | Path, **options) -> SourceResult:
    """Build a manifest from `root` with the named adapter; options go to that adapter."""
    key = source.strip().lower()
    if key not in _LOADERS:
        raise ManifestError(f"unknown source {source!r}; use one of {', '.join(SOURCES)}")
    fn = load_chexpert if key == "synthetic" else _LOADERS[key]
    accepted = [n for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ManifestError(f"source {key!r} takes no option(s) {unknown}; it accepts {accepted}")
    return _LOADERS[key](root, **options)


__all__ = ["SOURCES", "load_source", "load_chexpert", "load_nih", "load_kermany", "load_csv", "load_folder",
           "load_dicom"]
