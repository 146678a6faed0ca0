"""The manifest contract: one row per image, label space stored in the Parquet metadata.

Columns: image_id (unique, path relative to the dataset root), path (absolute or URI),
patient_id, study_id (nullable), view (nullable), split (nullable until split), then one
float32 column per class: targets in [0, 1] with NaN = no supervision, or for CheXpert-style
sources the raw 1 / 0 / -1 / blank (the label space's `values` says which; cxrray.labels).
Pure: pandas/pyarrow only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa

from cxrray import storage
from cxrray.labels import LabelSpace

BASE_COLUMNS: tuple[str, ...] = ("image_id", "path", "patient_id", "study_id", "view", "split")
META_KEY = b"cxrray.label_space"
EXTRA_META_KEY = b"cxrray.manifest_info"


class ManifestError(ValueError):
    """A manifest (or the CSV behind it) is not usable; the message says how to fix it."""


@dataclass
class Skipped:
    """Rows a source left out, with why; every source reports these instead of dropping silently."""

    rows: list[dict] = field(default_factory=list)

    def add(self, item: str, reason: str, detail: str = "") -> None:
        self.rows.append({"item": item, "reason": reason, "detail": detail})

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["item", "reason", "detail"])

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r["reason"]] = out.get(r["reason"], 0) + 1
        return out

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class SourceResult:
    """What every source adapter returns."""

    manifest: pd.DataFrame
    label_space: LabelSpace
    skipped: Skipped = field(default_factory=Skipped)
    info: dict = field(default_factory=dict)  # source-specific extras (duplicates, boxes count, ...)


def normalise(df: pd.DataFrame, label_space: LabelSpace) -> pd.DataFrame:
    """Put columns in contract order and dtypes; keeps extra columns (e.g. sex, age) at the end."""
    df = df.copy()
    for c in BASE_COLUMNS:
        if c not in df.columns:
            df[c] = None
    for n in label_space.columns:
        if n not in df.columns:
            raise ManifestError(f"manifest lacks label column {n!r} (label space {list(label_space.names)})")
        df[n] = df[n].astype("float32")
    for c in ("image_id", "path", "patient_id"):
        df[c] = df[c].astype(str)
    extra = [c for c in df.columns if c not in BASE_COLUMNS and c not in label_space.columns]
    return df[list(BASE_COLUMNS) + list(label_space.columns) + extra].reset_index(drop=True)


def validate(df: pd.DataFrame, label_space: LabelSpace) -> None:
    missing = [c for c in ("image_id", "path", "patient_id", *label_space.columns) if c not in df.columns]
    if missing:
        raise ManifestError(f"manifest is missing columns {missing}")
    dup = df["image_id"][df["image_id"].duplicated()]
    if len(dup):
        raise ManifestError(f"image_id must be unique; {len(dup)} duplicates, e.g. {dup.iloc[0]!r}")
    if "split" in df.columns and df["split"].notna().any():
        bad = set(df["split"].dropna().unique()) - {"train", "valid", "test"}
        if bad:
            raise ManifestError(f"split values must be train/valid/test, found {sorted(bad)}")


def write_manifest(df: pd.DataFrame, label_space: LabelSpace, out: str | Path, info: dict | None = None) -> str:
    """Write the manifest Parquet (a local path or a URI, atomically); returns where it went."""
    df = normalise(df, label_space)
    validate(df, label_space)
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[META_KEY] = json.dumps(label_space.to_dict()).encode()
    meta[EXTRA_META_KEY] = json.dumps(info or {}, default=str).encode()
    return storage.write_parquet(table.replace_schema_metadata(meta), out)


def read_manifest(path: str | Path) -> tuple[pd.DataFrame, LabelSpace]:
    path = storage.normalize(path)
    try:
        table = storage.read_parquet(path)
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest; build one with `cxrray manifest`") from None
    meta = table.schema.metadata or {}
    if META_KEY not in meta:
        raise ManifestError(f"{path}: not a cxrray manifest (no label space in its metadata)")
    space_dict = json.loads(meta[META_KEY])
    _refuse_policy_baked(path, space_dict, json.loads(meta.get(EXTRA_META_KEY, b"{}")))
    space = LabelSpace.from_dict(space_dict)
    df = table.to_pandas()
    validate(df, space)
    return df, space


def require_split_column(df: pd.DataFrame, path: str | Path) -> None:
    """Training and evaluation read rows by split: a manifest built without one is one line."""
    if "split" not in df.columns:
        raise ManifestError(f"{path}: has no split column; build the manifest with a split "
                            "(`cxrray manifest ... --split 0.8,0.1,0.1`)")


def _refuse_policy_baked(path: str, space: dict, info: dict) -> None:
    """Manifests from before raw labels (cxrray < issue 11) hold CheXpert labels with an
    uncertainty policy already applied: -1 is gone, so neither a new policy nor an evaluation
    on certain labels can be honest. Refuse them with the command that rebuilds one."""
    if "values" in space or "uncertainty" not in info:
        return
    source = info.get("source", "chexpert")
    root = info.get("dataset_dir") or "<dataset root>"
    policy = info["uncertainty"].get("default", "?") if isinstance(info["uncertainty"], dict) else info["uncertainty"]
    raise ManifestError(
        f"{path}: an older manifest whose labels have the uncertainty policy {policy} baked in; manifests now keep "
        f"the raw 1/0/-1/blank labels and training applies the policy. Rebuild it: cxrray manifest --source {source} "
        f"--root {root} --out {path} (and set `uncertainty: {policy}` in the training config)")


def manifest_info(path: str | Path) -> dict:
    meta = storage.parquet_file(path).schema_arrow.metadata or {}
    return json.loads(meta.get(EXTRA_META_KEY, b"{}"))
