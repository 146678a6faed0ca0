"""NIH ChestX-ray14 (Wang et al. 2017): Data_Entry CSV, official lists, boxes -> manifest.

The CSV header is quirky: `OriginalImage[Width,Height]` and `OriginalImagePixelSpacing[x,y]`
are not quoted, so each splits into two columns, and the original 2017 file ends every line
with a comma (an empty 12th column). Columns are therefore renamed by position around
those markers, not by name. The boxes file has the same problem (`Bbox [x,y,w,h]`).

image_id is the `Image Index` (e.g. `00000001_000.png`): stable whether the images sit in
one `images/` folder or in Kaggle's `images_001/images/ ...` folders, and the key the
official lists and the boxes file use. Pure: pandas/numpy only.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import re
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from cxrray.labels import MULTILABEL, NIH_14, LabelSpace
from cxrray.manifest import ManifestError, Skipped, SourceResult
from cxrray.sources.generic import finish, read_csv, require_columns, skip_rows, warn_if_no_files

log = logging.getLogger(__name__)

NO_FINDING = "No Finding"
_HINT = "is this an NIH Data_Entry_2017.csv? for other CSVs use --source csv --path-col ... --label-cols ..."
_SIMPLE_COLUMNS = {
    "imageindex": "image_index",
    "findinglabels": "findings",
    "findinglabel": "findings",
    "followup": "follow_up",
    "patientid": "patient_id",
    "patientage": "age",
    "patientgender": "sex",
    "patientsex": "sex",
    "viewposition": "view",
}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


# Finding spellings -> NIH_14 names ("Pleural Thickening", "Infiltrate" in the boxes file).
FINDING_ALIASES: dict[str, str] = {_key(n): n for n in NIH_14} | {"infiltrate": "Infiltration"}


def rename_columns(columns: list[str]) -> dict[str, str]:
    """Original column -> manifest-side name, handling the split bracket headers by position."""
    out: dict[str, str] = {}
    i = 0
    while i < len(columns):
        k = _key(columns[i])
        if k.startswith("originalimagepixelspacing"):
            out[columns[i]] = "pixel_spacing_x"
            if k == "originalimagepixelspacingx" and i + 1 < len(columns):
                out[columns[i + 1]] = "pixel_spacing_y"
                i += 1
        elif k.startswith("originalimage"):
            out[columns[i]] = "orig_width"
            if k == "originalimagewidth" and i + 1 < len(columns):
                out[columns[i + 1]] = "orig_height"
                i += 1
        elif k in _SIMPLE_COLUMNS:
            out[columns[i]] = _SIMPLE_COLUMNS[k]
        i += 1
    return out


def _find(root: Path, patterns: tuple[str, ...]) -> Path | None:
    for pat in patterns:
        hits = sorted(root.glob(pat))
        if hits:
            if len(hits) > 1:
                log.info("%s: several %s; using %s", root, pat, hits[0].name)
            return hits[0]
    return None


def _locate(root: Path, value, patterns: tuple[str, ...]) -> Path | None:
    """None: auto-find by pattern; False: don't use; a path: relative to root unless absolute."""
    if value is False:
        return None
    if value is None:
        return _find(root, patterns)
    p = Path(value)
    return p if p.is_absolute() or p.exists() else root / p


def _image_dirs(root: Path, images_dir) -> list[Path]:
    if images_dir is not None:
        p = Path(images_dir)
        return [p if p.is_absolute() or p.exists() else root / p]
    if (root / "images").is_dir():
        return [root / "images"]
    kaggle = sorted(p for p in root.glob("images_*/images") if p.is_dir())
    return kaggle or [root]


def parse_findings(findings: pd.Series) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """'Atelectasis|Effusion' -> 14 binary columns; rows with unknown or conflicting names flagged.

    Parses each distinct string once (a few hundred in 112k rows).
    """
    codes, uniques = pd.factorize(findings.fillna(""))
    table = np.zeros((len(uniques) + 1, len(NIH_14)), dtype=np.float32)
    problem: list[str] = [""] * (len(uniques) + 1)
    index = {n: j for j, n in enumerate(NIH_14)}
    for u, text in enumerate(uniques):
        parts = [p.strip() for p in str(text).split("|") if p.strip()]
        if not parts:
            problem[u] = "empty Finding Labels"
            continue
        names = [FINDING_ALIASES.get(_key(p), NO_FINDING if _key(p) == "nofinding" else None) for p in parts]
        unknown = [p for p, n in zip(parts, names) if n is None]
        if unknown:
            problem[u] = f"unknown finding(s) {unknown}; expected {NO_FINDING!r} or {list(NIH_14)}"
        elif NO_FINDING in names and len(names) > 1:
            problem[u] = f"{NO_FINDING!r} together with findings: {text!r}"
        else:
            for n in names:
                if n != NO_FINDING:
                    table[u, index[n]] = 1.0
    problem[-1] = "empty Finding Labels"
    values = table[codes]
    prob = np.array(problem, dtype=object)[codes]
    bad = prob != ""
    return values, bad, list(prob[bad])


def read_list(path: Path) -> list[str]:
    """Image names from an official list: the first whitespace token of each line (.gz ok)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt") as f:
            return [line.split()[0] for line in f if line.strip()]
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise ManifestError(f"{path}: not a readable image list ({e}); pass a text file of image names") from e


def read_boxes(path: Path) -> pd.DataFrame:
    """BBox_List_2017.csv -> image_index, label (NIH_14 spelling), x, y, w, h (1024-px space)."""
    hint = "pass bbox_csv=False to skip boxes, or the path of BBox_List_2017.csv"
    if not path.is_file():
        raise ManifestError(f"{path}: no such boxes file; {hint}")
    try:
        # The header `Image Index,Finding Label,Bbox [x,y,w,h],,,` has 9 fields, rows 6: read by position.
        raw = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
    except (ValueError, OSError, EOFError) as e:
        raise ManifestError(f"{path}: not a readable boxes CSV ({e}); {hint}") from e
    if raw.shape[1] < 6 or _key(str(raw.iat[0, 0])) != "imageindex":
        raise ManifestError(f"{path}: expected a header 'Image Index,Finding Label,Bbox [x,y,w,h]' "
                            f"and 6 columns; {hint}")
    df = raw.iloc[1:, :6].copy()
    df.columns = ["image_index", "label", "x", "y", "w", "h"]
    df["image_index"] = df["image_index"].str.strip()
    df["label"] = df["label"].map(lambda s: FINDING_ALIASES.get(_key(s), s.strip()))
    for c in "xywh":
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df.dropna(subset=list("xywh"))


def boxes_json(boxes: pd.DataFrame) -> dict[str, str]:
    """image_index -> JSON list [{"label", "x", "y", "w", "h"}, ...]."""
    out = {}
    for image, g in boxes.groupby("image_index", sort=False):
        out[image] = json.dumps([
            {"label": r.label, "x": round(r.x, 3), "y": round(r.y, 3), "w": round(r.w, 3), "h": round(r.h, 3)}
            for r in g.itertuples(index=False)
        ])
    return out


def load_nih(
    root: str | Path,
    *,
    csv: str | Path | None = None,
    images_dir: str | Path | None = None,
    train_val_list: str | Path | None | bool = None,
    test_list: str | Path | None | bool = None,
    split_lists: Mapping[str, str | Path] | None = None,
    bbox_csv: str | Path | None | bool = None,
    check_files: bool = True,
) -> SourceResult:
    """NIH ChestX-ray14 -> manifest with the 14 findings (No Finding = all zeros).

    csv: Data_Entry CSV (auto: Data_Entry_2017*.csv[.gz], then Data_Entry*.csv[.gz]).
    images_dir: auto root/images, root/images_*/images, or root. train_val_list/test_list:
    the official lists (auto-found in root when named train_val_list.txt / test_list.txt;
    False to ignore) -> split train / test. split_lists: any other {split: list file}, e.g.
    the CheXNet train/val/test lists. bbox_csv: boxes attached per image as JSON in `boxes`
    (auto BBox_List_2017.csv[.gz]; False to skip).
    """
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"{root}: not a folder; pass the NIH ChestX-ray14 folder (holding Data_Entry_2017.csv)")
    csv_path = _locate(root, csv, ("Data_Entry_2017*.csv", "Data_Entry_2017*.csv.gz",
                                   "Data_Entry*.csv", "Data_Entry*.csv.gz"))
    if csv_path is None:
        raise ManifestError(f"{root}: no Data_Entry_2017*.csv[.gz] or Data_Entry*.csv found; pass csv=...")
    df = read_csv(csv_path, what="NIH Data_Entry", hint=_HINT)
    df = df.rename(columns=rename_columns(list(df.columns)))
    for c in [c for c in df.columns if c.startswith("Unnamed")]:
        if (df[c].str.strip() == "").all():
            df = df.drop(columns=c)
    require_columns(df, csv_path, ["image_index", "findings", "patient_id"],
                    "expected 'Image Index', 'Finding Labels' and 'Patient ID'; " + _HINT)
    skipped = Skipped()
    space = LabelSpace(NIH_14, MULTILABEL)
    name = df["image_index"].str.strip()
    info: dict = {"csv": str(csv_path), "n_csv_rows": len(df)}

    values, bad, details = parse_findings(df["findings"])
    skip_rows(skipped, name[bad], "unknown_label_value", details)
    keep = ~bad

    dirs = _image_dirs(root, images_dir)
    info["images_dirs"] = [os.path.abspath(d) for d in dirs]
    located = {}
    if check_files or len(dirs) > 1:
        for d in dirs:  # listing a folder is far cheaper than one stat per image
            if d.is_dir():
                located.update({e.name: os.path.abspath(d) for e in os.scandir(d) if e.is_file()})
    base = os.path.abspath(dirs[0])
    folder = name.map(located).fillna(base) if located else pd.Series(base, index=name.index, dtype=str)
    out = pd.DataFrame({"image_id": name, "path": folder + "/" + name})
    out["patient_id"] = df["patient_id"].str.strip()
    out["study_id"] = None
    out["view"] = df["view"].str.strip().str.upper().replace("", None) if "view" in df.columns else None
    out["split"] = None
    for j, n in enumerate(NIH_14):
        out[n] = values[:, j]
    out["findings"] = df["findings"].str.strip()
    for c, kind in (("sex", None), ("age", float), ("follow_up", float), ("orig_width", float),
                    ("orig_height", float), ("pixel_spacing_x", float), ("pixel_spacing_y", float)):
        if c in df.columns:
            # Old releases wrote ages as '058Y'.
            out[c] = (pd.to_numeric(df[c].str.extract(r"([\d.]+)")[0], errors="coerce").astype("float32")
                      if kind else df[c].str.strip())

    keep &= _assign_lists(root, out, name, keep, train_val_list, test_list, split_lists, skipped, info)

    box_path = _locate(root, bbox_csv, ("BBox_List_2017.csv", "BBox_List_2017.csv.gz", "BBox_List*.csv*"))
    out["boxes"] = None
    if box_path is not None:
        boxes = read_boxes(box_path)
        per_image = boxes_json(boxes)
        out["boxes"] = name.map(per_image)
        info["bbox_csv"] = str(box_path)

    if check_files:
        exists = name.isin(located.keys()).to_numpy()
        missing = keep & ~exists
        skip_rows(skipped, name[missing], "missing_file", out["path"][missing])
        warn_if_no_files(int(keep.sum()), int(missing.sum()), dirs[0])
        keep &= exists
    extra = ""
    if box_path is not None:
        with_boxes = keep & out["boxes"].notna().to_numpy()
        info["images_with_boxes"] = int(with_boxes.sum())
        info["boxes"] = int(boxes["image_index"].isin(set(name[with_boxes])).sum())
        extra = f"{info['images_with_boxes']:,} images with {info['boxes']:,} boxes"
    return finish("nih", out.loc[keep], space, skipped, info, extra)


def _assign_lists(root, out, name, keep, train_val_list, test_list, split_lists, skipped, info) -> np.ndarray:
    """Fill out['split'] from the official lists; returns the rows to keep (conflicts dropped)."""
    lists: dict[str, list[Path]] = {}
    tv = _locate(root, train_val_list, ("train_val_list.txt", "train_val_list.txt.gz"))
    te = _locate(root, test_list, ("test_list.txt", "test_list.txt.gz"))
    if tv is not None:
        lists.setdefault("train", []).append(tv)
    if te is not None:
        lists.setdefault("test", []).append(te)
    for split, p in (split_lists or {}).items():
        if split not in ("train", "valid", "test"):
            raise ValueError(f"split_lists keys must be train/valid/test, got {split!r}")
        lists.setdefault(split, []).append(_locate(root, p, ()))
    if not lists:
        return np.ones(len(out), dtype=bool)
    owner: dict[str, str] = {}
    conflicts: dict[str, str] = {}
    for split, paths in lists.items():
        for p in paths:
            for image in read_list(p):
                if owner.get(image, split) != split:
                    conflicts[image] = f"listed in both {owner[image]} and {split}"
                owner[image] = split
    out["split"] = name.map(owner)
    conflict = name.isin(conflicts.keys()).to_numpy()
    skip_rows(skipped, name[keep & conflict], "conflicting_split", [conflicts[n] for n in name[keep & conflict]])
    info["split_lists"] = {k: [str(p) for p in v] for k, v in lists.items()}
    info["unlisted"] = int((keep & ~conflict & out["split"].isna().to_numpy()).sum())
    if info["unlisted"]:
        log.warning("%d NIH images are in none of the split lists; their split is left empty", info["unlisted"])
    return ~conflict
