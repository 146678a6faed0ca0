"""The one way a manifest is built: source -> rows -> patient split -> leakage check -> Parquet.

`cxrray manifest`, `cxrray train` (when its manifest does not exist yet) and `cxrray demo` all
call `build_manifest`, so a split that leaks is reported (or refused, on_leakage=refuse) the
same way whichever command made it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import pandas as pd

from cxrray import storage
from cxrray.config import ManifestConfig
from cxrray.labels import LabelSpace
from cxrray.manifest import ManifestError, Skipped, write_manifest
from cxrray.splits import LeakageReport, assign_splits, check_leakage

log = logging.getLogger(__name__)


class LeakageRefused(ValueError):
    """on_leakage=refuse and the split shares patients or identical images across splits."""


@dataclass
class BuiltManifest:
    path: str
    frame: pd.DataFrame
    label_space: LabelSpace
    skipped: Skipped
    info: dict
    leakage: LeakageReport | None
    skipped_csv: str | None
    seconds: float


def skipped_path(manifest: str) -> str:
    """manifest.parquet -> manifest.skipped.csv beside it (local or URI)."""
    base, sep, query = manifest.partition("?")
    return (base[: -len(".parquet")] if base.endswith(".parquet") else base) + ".skipped.csv" + sep + query


def build_manifest(cfg: ManifestConfig) -> BuiltManifest:
    """Read the source, split by patient (cfg.split), check leakage, write the manifest."""
    from cxrray.sources import load_source

    start = time.time()
    storage.check_store(cfg.out, what="manifest out")
    storage.check_target(cfg.out, folder=False, what="manifest out")
    storage.check_store(cfg.root, what="root")
    res = load_source(cfg.source, cfg.root, **cfg.loader_options())
    df = res.manifest
    if df.empty:  # as `cxrray score` refuses an input without images: a manifest of nothing is a mistake
        why = ", ".join(f"{n} {r}" for r, n in sorted(res.skipped.counts().items())) or "no files"
        raise ManifestError(f"{cfg.root}: no images for a manifest ({why})")
    if cfg.split:
        has_official = df["split"].notna().any()
        df = assign_splits(df, res.label_space, tuple(cfg.split), seed=cfg.seed, respect_existing=has_official)
    leak = None
    if df["split"].notna().any() and cfg.leakage_check:
        leak = check_leakage(df, hash_images=cfg.hash_images)  # logs its summary
        if not leak.ok:
            if cfg.on_leakage == "refuse":
                raise LeakageRefused(f"{cfg.root}: {leak.summary()} (manifest not written: on_leakage=refuse)")
            log.warning("the split of %s leaks: %s", cfg.out, leak.summary())
    out = write_manifest(df, res.label_space, cfg.out, info={"source": cfg.source, "root": str(cfg.root),
                                                             "skipped": res.skipped.counts()})
    skipped_csv = None
    if len(res.skipped):
        skipped_csv = storage.write_text(skipped_path(out), res.skipped.frame().to_csv(index=False))
    return BuiltManifest(out, df, res.label_space, res.skipped, res.info, leak, skipped_csv, time.time() - start)
