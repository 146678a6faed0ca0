"""CheXpert (Irvin et al. 2019): train.csv / valid.csv -> manifest.

Layouts: `CheXpert-v1.0/` and `CheXpert-v1.0-small/`, each holding train.csv, valid.csv
(or .csv.gz) and train/ valid/ image folders. The CSV's Path column is relative to the
folder *containing* the dataset folder (`CheXpert-v1.0-small/train/patient00001/...`).

Everything is vectorised: the real 223,414-row train.csv becomes a manifest in about a
second without images (check_files=False). Pure: pandas/numpy only.
"""
from __future__ import annotations

import logging
import os
import posixpath
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from cxrray import storage
from cxrray.labels import ALLOWED_RAW, CHEXPERT_14, chexpert_space, resolve_label_names
from cxrray.manifest import ManifestError, Skipped, SourceResult
from cxrray.sources.generic import (
    describe_bad_cells,
    drop_missing_files,
    finish,
    parse_numbers,
    read_csv,
    require_columns,
    skip_rows,
)

log = logging.getLogger(__name__)

DATASET_DIRS: tuple[str, ...] = ("CheXpert-v1.0-small", "CheXpert-v1.0")
CSV_NAMES: tuple[str, ...] = ("train", "valid", "test")
_SPLIT_OF_CSV = {"train": "train", "valid": "valid", "val": "valid", "test": "test"}
_PATH_RE = r"(?:^|/)(?P<patient>patient\d+)/(?P<study>study\d+)/[^/]+$"
_HINT = ("is this a CheXpert train.csv/valid.csv? for other CSVs use --source csv "
         "--path-col ... --label-cols ...")


def find_csvs(root: str | Path, csvs: Sequence[str | Path] | None = None) -> tuple[Path, list[Path]]:
    """(dataset folder, CSV files) for any accepted form of `root`.

    root: a CSV file; the folder holding train.csv/valid.csv; or the folder containing
    `CheXpert-v1.0-small/` or `CheXpert-v1.0/`. csvs: names ("train", "valid.csv") or paths.
    """
    if storage.is_uri(root):
        return _find_csvs_uri(storage.normalize(root), csvs)
    root = Path(root)
    if not root.exists():
        raise ManifestError(f"{root}: no such file or folder; pass a CheXpert folder or its train.csv")
    if root.is_file():
        return root.parent, [root]
    dataset_dir = root
    if not _csvs_in(root):
        for name in (*DATASET_DIRS, *sorted(p.name for p in root.glob("CheXpert*") if p.is_dir())):
            if _csvs_in(root / name):
                dataset_dir = root / name
                break
        else:
            raise ManifestError(
                f"{root}: no train.csv or valid.csv here nor in {root}/CheXpert-v1.0-small/ or "
                f"{root}/CheXpert-v1.0/; pass the folder that holds train.csv, or the CSV itself")
    if csvs is None:
        return dataset_dir, _csvs_in(dataset_dir)
    files = []
    for c in csvs:
        c = Path(c)
        if c.is_absolute() or c.exists():
            files.append(c)
            continue
        candidates = [dataset_dir / c, dataset_dir / f"{c}.csv", dataset_dir / f"{c}.csv.gz"]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise ManifestError(f"{dataset_dir}: no CSV named {str(c)!r} (tried {[p.name for p in candidates]})")
        files.append(found)
    return dataset_dir, files


def _find_csvs_uri(root: str, csvs: Sequence[str | Path] | None) -> tuple[str, list[str]]:
    """find_csvs for a bucket prefix (s3://.../CheXpert-v1.0-small): the same accepted forms."""
    if storage.is_file(root):
        return posixpath.dirname(root), [root]
    for dataset_dir in (root, *(storage.join(root, d) for d in DATASET_DIRS)):
        found = _csvs_in_uri(dataset_dir)
        if found:
            break
    else:
        raise ManifestError(f"{root}: no train.csv or valid.csv here nor in {root}/CheXpert-v1.0-small/ or "
                            f"{root}/CheXpert-v1.0/; pass the prefix that holds train.csv, or the CSV itself")
    if csvs is None:
        return dataset_dir, found
    files = []
    for c in map(str, csvs):
        candidates = [c] if storage.is_uri(c) else [storage.join(dataset_dir, n) for n in (c, f"{c}.csv", f"{c}.csv.gz")]
        hit = next((p for p in candidates if storage.is_file(p)), None)
        if hit is None:
            raise ManifestError(f"{dataset_dir}: no CSV named {c!r} (tried {candidates})")
        files.append(hit)
    return dataset_dir, files


def _csvs_in_uri(folder: str) -> list[str]:
    names = set(storage.list_dir(folder))
    found = (next((f"{n}{sfx}" for sfx in (".csv", ".csv.gz") if f"{n}{sfx}" in names), None) for n in CSV_NAMES)
    return [storage.join(folder, f) for f in found if f]


def _csvs_in(folder: Path) -> list[Path]:
    out = []
    for name in CSV_NAMES:
        for suffix in (".csv", ".csv.gz"):
            if (folder / f"{name}{suffix}").is_file():
                out.append(folder / f"{name}{suffix}")
                break
    return out


def _csv_split(path: str | Path) -> str | None:
    stem = storage.name(path).split(".")[0].lower()
    return _SPLIT_OF_CSV.get(stem)


def _as_set(value, allowed: set[str] | None, what: str, case) -> set[str] | None:
    if value is None:
        return None
    values = {case(v.strip()) for v in ([value] if isinstance(value, str) else value)}
    if allowed is not None and not values <= allowed:
        raise ValueError(f"{what} must be among {sorted(allowed)}, got {sorted(values)}")
    return values


def resolve_paths(rel: pd.Series, dataset_dir: Path) -> pd.Series:
    """Absolute image paths for CSV Path values.

    `CheXpert-v1.0-small/train/...` resolves against the dataset folder's parent when the
    folder keeps its name; `train/...` against the dataset folder; a renamed folder (e.g.
    `chexpert/train.csv` holding `CheXpert-v1.0-small/...`) drops the first component.
    """
    ddir = str(dataset_dir) if storage.is_uri(dataset_dir) else os.path.abspath(dataset_dir)
    same = rel.str.startswith(storage.name(ddir) + "/")
    in_ddir = rel.str.startswith(("train/", "valid/", "test/"))
    absolute = rel.str.startswith("/")
    out = ddir + "/" + rel
    out = out.where(~same, posixpath.dirname(ddir) + "/" + rel)
    other = ~(same | in_ddir | absolute)
    if other.any():
        out = out.where(~other, ddir + "/" + rel.str.replace(r"^[^/]*/", "", regex=True))
    return out.where(~absolute, rel)


def extract_ids(rel: pd.Series) -> pd.DataFrame:
    """patient / study columns from paths (NaN where the path doesn't fit), via Arrow's
    vectorised regex: pandas' str.extract loops in Python (1 s on the real train.csv)."""
    found = pc.extract_regex(pa.array(rel), _PATH_RE)
    if isinstance(found, pa.ChunkedArray):
        found = found.combine_chunks()
    return pd.DataFrame({k: pd.Series(pc.struct_field(found, k), dtype="str", index=rel.index) for k in ("patient", "study")})


def _raw_labels(df: pd.DataFrame, names: Sequence[str], rel: pd.Series, keep: np.ndarray,
                skipped: Skipped) -> tuple[np.ndarray, np.ndarray]:
    """Raw values (rows x labels, NaN = blank) and the rows holding anything but 1/0/-1/blank,
    which are recorded as skipped (`unknown_label_value`) unless already filtered out."""
    raw = np.empty((len(df), len(names)))
    bad_cells = {}
    for j, name in enumerate(names):
        vals, nonnum = parse_numbers(df[name])
        bad_cells[name] = nonnum | (~np.isnan(vals) & ~np.isin(vals, ALLOWED_RAW))
        raw[:, j] = vals
    bad = np.logical_or.reduce(list(bad_cells.values())) if names else np.zeros(len(df), dtype=bool)
    rows = np.flatnonzero(keep & bad)
    skip_rows(skipped, rel.iloc[rows], "unknown_label_value",
              [d + " (CheXpert labels are 1, 0, -1 or blank)" for d in describe_bad_cells(df, bad_cells, rows)])
    return raw, bad


def load_chexpert(
    root: str | Path,
    *,
    csvs: Sequence[str | Path] | None = None,
    labels: str | Sequence[str] | None = CHEXPERT_14,
    views: str | Sequence[str] | None = None,
    ap_pa: str | Sequence[str] | None = None,
    check_files: bool = True,
    official_split: bool = True,
) -> SourceResult:
    """CheXpert CSV(s) -> manifest.

    labels: names or a named selection ("chexpert5"); their cells keep the labeler's raw
    1 / 0 / -1 / blank (the uncertainty policy is the training config's). views: keep
    "frontal" and/or "lateral" rows. ap_pa: keep rows whose AP/PA value is listed (laterals
    have none, so ap_pa=("AP", "PA") also drops them). Unknown label values skip the row
    (`unknown_label_value`); official_split puts train.csv rows in "train", valid.csv in "valid".
    """
    names = resolve_label_names(labels, CHEXPERT_14)
    space = chexpert_space(names)
    view_set = _as_set(views, {"frontal", "lateral"}, "views", str.lower)
    appa_set = _as_set(ap_pa, None, "ap_pa", str.upper)
    dataset_dir, files = find_csvs(root, csvs)

    frames = []
    for f in files:
        df = read_csv(f, what="CheXpert", hint=_HINT)
        require_columns(df, f, ["Path", *names], _HINT)
        df["_source_split"] = _csv_split(f)
        frames.append(df)
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    skipped = Skipped()
    info: dict = {"dataset_dir": storage.normalize(dataset_dir), "csvs": [str(f) for f in files],
                  "n_csv_rows": len(df)}

    rel = df["Path"].str.strip()
    if rel.str.contains("\\", regex=False).any():
        rel = rel.str.replace("\\", "/", regex=False)
    ids = extract_ids(rel)
    bad_path = ids["patient"].isna().to_numpy()
    skip_rows(skipped, rel[bad_path], "unparseable_path", "expected .../patientNNNNN/studyN/<file>")

    if "Frontal/Lateral" in df.columns:
        fl = df["Frontal/Lateral"].str.strip().str.capitalize()
    else:  # some derived CSVs drop the column; the file name still says it
        fl = pd.Series(np.where(rel.str.contains("_lateral", regex=False), "Lateral",
                                np.where(rel.str.contains("_frontal", regex=False), "Frontal", "")),
                       index=df.index, dtype=str)
    appa = df["AP/PA"].str.strip().str.upper() if "AP/PA" in df.columns else pd.Series("", index=df.index, dtype=str)

    keep = ~bad_path
    filtered = {}
    if view_set is not None:
        sel = fl.str.lower().isin(view_set).to_numpy()
        filtered["views"] = int((keep & ~sel).sum())
        keep &= sel
    if appa_set is not None:
        sel = appa.isin(appa_set).to_numpy()
        filtered["ap_pa"] = int((keep & ~sel).sum())
        keep &= sel
    info["filtered_out"] = filtered

    raw, bad_label = _raw_labels(df, names, rel, keep, skipped)
    keep &= ~bad_label

    out = pd.DataFrame({"image_id": rel})
    out["path"] = resolve_paths(rel, dataset_dir)
    out["patient_id"] = ids["patient"]
    out["study_id"] = ids["patient"] + "/" + ids["study"]
    out["view"] = appa.where(appa != "", None).where(fl != "Lateral", "LATERAL")
    source_split = df["_source_split"]
    if source_split.isna().any():  # a CSV not named train/valid: the path's folder tells
        from_path = rel.str.extract(r"(?:^|/)(train|valid|test)/patient\d+/")[0]
        source_split = source_split.fillna(from_path)
    out["split"] = source_split if official_split else None
    for j, name in enumerate(names):
        out[name] = raw[:, j].astype(np.float32)  # raw: 1 / 0 / -1 / NaN (blank); rows not kept are dropped
    if "Sex" in df.columns:
        out["sex"] = df["Sex"].str.strip()
    if "Age" in df.columns:
        out["age"] = pd.to_numeric(df["Age"], errors="coerce").astype("float32")
    out["frontal_lateral"] = fl
    out["source_split"] = source_split

    if check_files:
        keep = drop_missing_files(keep, out["path"], rel, skipped, dataset_dir)
    out = out.loc[keep]
    n_frontal = int((out["frontal_lateral"] == "Frontal").sum())
    n_uncertain = int((out[list(names)].to_numpy() == -1.0).any(axis=1).sum())
    extra = f"{n_frontal:,} frontal / {len(out) - n_frontal:,} lateral; {n_uncertain:,} with an uncertain label"
    return finish("chexpert", out, space, skipped, info, extra)
