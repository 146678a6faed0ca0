"""The labels CSV of a DICOM archive, joined onto the headers that cxrray.sources.dicom read.

Label columns parse as in the csv source (numbers in [0, 1], blank = no supervision); rows join
on SOPInstanceUID (one row per image) or AccessionNumber (one row per study: every image of the
study gets it). Images whose key has no row, a row with a bad value, or rows that disagree are
reported in Skipped. Kept apart from the header scan: it never opens a DICOM file, it sees only
the frame of UIDs and the accession number, which the caller drops after the join.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from cxrray import storage
from cxrray.labels import LabelSpace
from cxrray.manifest import ManifestError, Skipped
from cxrray.sources.generic import _numeric_labels, parse_numbers, read_csv, require_columns, skip_rows

log = logging.getLogger(__name__)

JOIN_KEYS: tuple[str, ...] = ("SOPInstanceUID", "AccessionNumber")
# Columns of a labels CSV that are never labels (compared case-insensitively).
_ID_COLUMNS = frozenset(c.lower() for c in (
    *JOIN_KEYS, "sop_uid", "sop_instance_uid", "accession", "accession_number", "StudyInstanceUID", "study_uid",
    "SeriesInstanceUID", "series_uid", "path", "image_id", "chexpert_path", "PatientID", "patient_id",
))
_ALIASES = {"SOPInstanceUID": ("sop_uid", "sop_instance_uid"), "AccessionNumber": ("accession", "accession_number")}
_LABELS_HINT = "pass labels_csv with a SOPInstanceUID or AccessionNumber column and numeric label columns"


def _key_column(csv: pd.DataFrame, path, join_on: str) -> str:
    lower = {c.lower(): c for c in csv.columns}
    for name in (join_on, *_ALIASES[join_on]):
        if name.lower() in lower:
            return lower[name.lower()]
    require_columns(csv, path, [join_on], f"name the column {join_on} (or pass join_on=...); {_LABELS_HINT}")
    raise AssertionError("unreachable")


def _label_columns(csv: pd.DataFrame, path, key: str, label_cols: Sequence[str] | None) -> list[str]:
    if label_cols is not None:
        require_columns(csv, path, label_cols, f"pass --label-cols naming columns of {storage.name(path)}")
        return list(label_cols)
    cols = []
    for c in csv.columns:
        if c == key or c.lower() in _ID_COLUMNS:
            continue
        vals, bad = parse_numbers(csv[c])
        if not bad.any() and not np.isnan(vals).all():
            cols.append(c)
    if not cols:
        raise ManifestError(f"{path}: no numeric label columns (columns: {', '.join(csv.columns)}); "
                            f"pass label_cols=[...] / --label-cols")
    return cols


def join_labels(df: pd.DataFrame, labels_csv, join_on: str, label_cols, task: str,
                skipped: Skipped) -> tuple[pd.DataFrame, LabelSpace, dict]:
    """(the images of `df` that have labels, with them; the label space; what goes into info)."""
    path = labels_csv if storage.is_uri(labels_csv) else Path(labels_csv)
    csv = read_csv(path, what="labels", hint=_LABELS_HINT)
    key_col = _key_column(csv, path, join_on)
    cols = _label_columns(csv, path, key_col, label_cols)
    space, values, bad, details = _numeric_labels(csv, cols, task)
    keys = csv[key_col].astype(str).str.strip()
    blank = (keys == "").to_numpy()
    if blank.any():
        skip_rows(skipped, [f"{storage.name(path)}:row{i + 2}" for i in np.flatnonzero(blank)], "unparseable_path",
                  f"empty {key_col!r}")
    detail_of = dict(zip(keys[bad].tolist(), details))
    table = pd.DataFrame(values, columns=list(space.columns))
    table.insert(0, "_key", keys)
    table = table[~blank & ~bad].drop_duplicates()  # identical rows (one per image of a study) collapse
    conflicting = set(table.loc[table["_key"].duplicated(), "_key"])
    table = table[~table["_key"].isin(conflicting)].set_index("_key")

    image_key = df["sop_uid"] if join_on == "SOPInstanceUID" else df["accession"]
    found = image_key.isin(table.index).to_numpy()
    is_bad = image_key.isin(detail_of.keys()).to_numpy() & ~found
    is_conflict = image_key.isin(conflicting).to_numpy()
    missing = ~found & ~is_bad & ~is_conflict
    skip_rows(skipped, df["image_id"][is_bad], "unknown_label_value", [detail_of[k] for k in image_key[is_bad]])
    skip_rows(skipped, df["image_id"][is_conflict], "conflicting_labels",
              f"rows of {storage.name(path)} with this image's {join_on} disagree")
    skip_rows(skipped, df["image_id"][missing], "no_label_row", f"no row of {storage.name(path)} has its {join_on}")
    out = df[found].reset_index(drop=True)
    labels = table.reindex(image_key[found].to_numpy())
    for name in space.columns:
        out[name] = labels[name].to_numpy(dtype=np.float32)
    unmatched = int((~table.index.isin(image_key)).sum())
    if unmatched:
        log.warning("%s: %d label rows match no image under the root (by %s)", path, unmatched, join_on)
    return out, space, {"labels_csv": str(path), "join_on": join_on, "label_rows": len(csv),
                        "labels_unmatched": unmatched}
