"""Generic sources: any CSV of image paths and labels, or a bare folder of images.

Also home of the CSV helpers every adapter shares (typed errors that name the file, the
column and the fix; vectorised label parsing; file checks; the summary line). Pure:
pandas/numpy only, no Ray.
"""
from __future__ import annotations

import io
import logging
import os
import posixpath
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from cxrray import storage
from cxrray.files import walk_files
from cxrray.labels import MULTICLASS, MULTILABEL, LabelSpace
from cxrray.manifest import ManifestError, Skipped, SourceResult, normalise

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp")
# Cells that mean "blank" in hand-made CSVs; everything else must parse as a number.
BLANK_TOKENS = frozenset({"", "nan", "NaN", "NA", "N/A", "null", "None"})
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "valid": "valid", "val": "valid", "validation": "valid", "dev": "valid",
    "test": "test", "testing": "test",
}
_DELIMITERS = {";": "semicolon", "\t": "tab", "|": "pipe"}


# ----------------------------------------------------------------------------- CSV helpers


def read_csv(path: str | Path, *, what: str, hint: str) -> pd.DataFrame:
    """Read a CSV (or .csv.gz) as strings, blanks as '', column names stripped.

    Anything pandas cannot tokenise (binary, ragged rows, bad gzip) becomes a ManifestError
    naming the file and `hint` (what to do instead).
    """
    if not storage.is_uri(path):
        path = Path(path)
    if not storage.is_file(path):
        raise ManifestError(f"{path}: no such {what} file; {hint}")
    try:
        # The Arrow reader is 2-3x faster (CheXpert's 223k rows: ~0.3 s); anything it
        # rejects goes to the C reader, whose errors say which line is wrong.
        df = pd.read_csv(*_csv_input(path), dtype=str, keep_default_na=False, engine="pyarrow").fillna("")
    except Exception:  # noqa: BLE001 - any refusal: retry with the stricter, clearer reader
        df = _read_csv_c(path, what, hint)
    df.columns = [str(c).strip() or f"Unnamed: {i}" for i, c in enumerate(df.columns)]
    return df


def _csv_input(path: str | Path) -> tuple:
    """pandas' input for a local path, or the bytes of a URI (compression from the name)."""
    if not storage.is_uri(path):
        return (path,)
    gz = storage.name(path).lower().endswith(".gz")
    return io.BytesIO(storage.read_bytes(path)), *(("gzip",) if gz else ())


def _read_csv_c(path: str | Path, what: str, hint: str) -> pd.DataFrame:
    source, *compression = _csv_input(path)
    try:
        with warnings.catch_warnings():
            # Rows longer than the header otherwise lose their last cells with only a warning.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = pd.read_csv(source, dtype=str, keep_default_na=False, index_col=False,
                             compression=compression[0] if compression else "infer")
    except pd.errors.EmptyDataError as e:
        raise ManifestError(f"{path}: empty file, not a {what} CSV; {hint}") from e
    except (ValueError, OSError, EOFError, pd.errors.ParserWarning) as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ManifestError(f"{path}: not a readable {what} CSV ({reason}); {hint}") from e
    return df


def require_columns(df: pd.DataFrame, path: str | Path, columns: Iterable[str], hint: str) -> None:
    """Raise ManifestError for the first missing column, listing the columns that exist."""
    for col in columns:
        if col in df.columns:
            continue
        shown = ", ".join(map(str, df.columns[:30])) + (", ..." if len(df.columns) > 30 else "")
        delim = ""
        if len(df.columns) == 1:
            for d, name in _DELIMITERS.items():
                if d in str(df.columns[0]):
                    delim = f"; the header looks {name}-separated, save the file comma-separated"
                    break
        raise ManifestError(f"{path}: column {col!r} not found (columns: {shown}){delim}; {hint}")


def parse_numbers(col: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """String cells -> float64 (NaN for blank) and a mask of cells that are not numbers.

    Label columns hold a handful of distinct strings, so parse each distinct value once
    (factorize) instead of every cell: 223k rows x 14 columns take milliseconds.
    """
    codes, uniques = pd.factorize(col, use_na_sentinel=True)
    vals = np.full(len(uniques) + 1, np.nan)  # the extra slot serves code -1 (missing)
    bad = np.zeros(len(uniques) + 1, dtype=bool)
    for i, s in enumerate(uniques):
        s = str(s).strip()
        if s in BLANK_TOKENS:
            continue
        try:
            vals[i] = float(s)
        except ValueError:
            bad[i] = True
        else:
            bad[i] = not np.isfinite(vals[i])
    return vals[codes], bad[codes]


def describe_bad_cells(df: pd.DataFrame, bad: dict[str, np.ndarray], rows: np.ndarray) -> list[str]:
    """'Edema='2.0'; Cardiomegaly='yes'' for each row index in `rows` (only the bad rows)."""
    out = []
    for r in rows:
        cells = [f"{c}={df[c].iat[r]!r}" for c, mask in bad.items() if mask[r]]
        out.append("; ".join(cells))
    return out


def skip_rows(skipped: Skipped, items: Iterable, reason: str, details: Iterable[str] | str = "") -> None:
    """Record many skipped rows at once."""
    items = [str(i) for i in items]
    if isinstance(details, str):
        details = [details] * len(items)
    skipped.rows.extend({"item": i, "reason": reason, "detail": d} for i, d in zip(items, details))


def files_exist(paths: pd.Series) -> np.ndarray:
    """Does each path exist? Local paths by os.path.exists; URIs by one recursive listing of
    their common prefix (one request per 1,000 objects, not one per image)."""
    codes, uniques = pd.factorize(paths)
    if not len(uniques):
        return np.zeros(len(paths), dtype=bool)
    uris = [p for p in uniques if storage.is_uri(p)]
    listed: set[str] = set()
    if uris:
        prefix = posixpath.commonpath([u.split("://", 1)[1] for u in uris])
        base = uris[0].split("://", 1)[0] + "://" + prefix
        if len(uris) == 1:
            base = posixpath.dirname(base)
        listed = {storage.join(base, rel) for rel, _ in storage.list_files(base)}
    found = np.array([p in listed if storage.is_uri(p) else os.path.exists(p) for p in uniques], dtype=bool)
    return found[codes]


def warn_if_no_files(n_rows: int, n_missing: int, where: str | Path) -> None:
    if n_rows and n_missing == n_rows:
        log.warning(
            "none of the %s images exist under %s; pass check_files=False to build a manifest "
            "from the CSV alone", f"{n_rows:,}", where)


def drop_missing_files(keep: np.ndarray, paths: pd.Series, items: pd.Series, skipped: Skipped,
                       where: str | Path, exists: np.ndarray | None = None) -> np.ndarray:
    """`keep` less the rows whose file is absent, each recorded as a `missing_file` skip (its
    item, its path), with a warning when not one kept row has its file. `exists` defaults to
    files_exist(paths); a source that has listed its folders already passes its own answer."""
    if exists is None:
        exists = files_exist(paths)
    missing = keep & ~exists
    skip_rows(skipped, items[missing], "missing_file", paths[missing])
    warn_if_no_files(int(keep.sum()), int(missing.sum()), where)
    return keep & exists


def drop_duplicate_ids(df: pd.DataFrame, skipped: Skipped) -> pd.DataFrame:
    dup = df["image_id"].duplicated(keep="first").to_numpy()
    if dup.any():
        skip_rows(skipped, df.loc[dup, "image_id"], "duplicate_id", "same image_id as an earlier row")
        df = df.loc[~dup]
    return df


def summary_line(name: str, df: pd.DataFrame, space: LabelSpace, skipped: Skipped, extra: str = "") -> str:
    splits = df["split"].value_counts(dropna=False) if len(df) else pd.Series(dtype=int)
    split_txt = ", ".join(f"{'unsplit' if pd.isna(k) else k} {v:,}" for k, v in splits.items()) or "none"
    skip_txt = ", ".join(f"{k} {v:,}" for k, v in skipped.counts().items()) or "none"
    text = (f"{name}: {len(df):,} images of {df['patient_id'].nunique():,} patients, "
            f"{space.num_classes} classes ({space.task}); splits: {split_txt}; skipped: {skip_txt}")
    return text + (f"; {extra}" if extra else "")


def finish(name: str, df: pd.DataFrame, space: LabelSpace, skipped: Skipped, info: dict,
           extra: str = "") -> SourceResult:
    """Deduplicate ids, put columns in contract order, and write the summary into info."""
    df = drop_duplicate_ids(df, skipped)
    df = normalise(df, space)
    info = {"source": name, **info, "rows": len(df), "skipped": skipped.counts()}
    info["summary"] = summary_line(name, df, space, skipped, extra)
    log.info(info["summary"])
    return SourceResult(df, space, skipped, info)


def normalise_split(values: pd.Series) -> pd.Series:
    """Map split spellings (val, validation, training, ...) to train/valid/test; others to NaN."""
    return values.astype(str).str.strip().str.lower().map(SPLIT_ALIASES)


# ----------------------------------------------------------------------------- load_csv

_CSV_HINT = "pass path_col=..., label_cols=[...] (or class_col=...) naming this CSV's columns"


def load_csv(
    csv: str | Path,
    *,
    root: str | Path | None = None,
    path_col: str = "path",
    label_cols: Sequence[str] | None = None,
    class_col: str | None = None,
    classes: Sequence[str] | None = None,
    patient_col: str | None = None,
    study_col: str | None = None,
    view_col: str | None = None,
    split_col: str | None = None,
    task: str = MULTILABEL,
    check_files: bool = True,
) -> SourceResult:
    """Any CSV with one row per image.

    Labels come either from numeric `label_cols` (0/1 or soft targets in [0, 1]; blank =
    no supervision; `task` multilabel or multiclass) or from one `class_col` holding class
    names (multiclass, one-hot; `classes` fixes their order, default sorted). Relative
    paths are joined to `root` (default: the CSV's folder). Without `patient_col`, every
    image is its own patient: splits then cannot keep a patient's images together.
    """
    csv = Path(csv)
    root = Path(root) if root is not None else csv.parent
    df = read_csv(csv, what="image-list", hint=_CSV_HINT)
    if label_cols is None and class_col is None:
        raise ManifestError(
            f"{csv}: say which columns hold labels: label_cols=[...] for numeric 0/1 columns, "
            f"class_col=... for one column of class names, or label_cols=[] for no labels "
            f"(columns: {', '.join(df.columns)})")
    hint = f"pass --path-col/--label-cols/--patient-col naming columns of {csv.name}"
    wanted = [path_col, *(label_cols or []), *(c for c in (class_col, patient_col, study_col, view_col, split_col) if c)]
    require_columns(df, csv, wanted, hint)
    skipped = Skipped()

    rel = df[path_col].astype(str).str.strip().str.replace("\\", "/", regex=False)
    empty = (rel == "").to_numpy()
    if empty.any():
        skip_rows(skipped, [f"{csv.name}:row{i + 2}" for i in np.flatnonzero(empty)], "unparseable_path",
                  f"empty {path_col!r}")
    df, rel = df.loc[~empty].reset_index(drop=True), rel.loc[~empty].reset_index(drop=True)
    root_abs = os.path.abspath(root)
    is_abs = rel.str.startswith("/") | rel.str.contains("://", regex=False)
    paths = rel.where(is_abs, root_abs + "/" + rel)
    out = pd.DataFrame({"image_id": rel, "path": paths})
    if patient_col:
        pid = df[patient_col].astype(str).str.strip()
        out["patient_id"] = pid.where(pid != "", rel)  # a blank patient stands alone
    else:
        out["patient_id"] = rel
    if not patient_col:
        log.warning("%s: no patient column; each image counts as its own patient, so patient-grouped "
                    "splits cannot prevent leakage (pass patient_col=...)", csv)
    out["study_id"] = df[study_col].astype(str).str.strip() if study_col else None
    out["view"] = df[view_col].astype(str).str.strip().str.upper().replace("", None) if view_col else None

    keep = np.ones(len(df), dtype=bool)
    if split_col:
        raw = df[split_col].astype(str).str.strip()
        out["split"] = normalise_split(raw)
        bad = (raw != "").to_numpy() & out["split"].isna().to_numpy()
        if bad.any():
            skip_rows(skipped, rel[bad], "unknown_split",
                      [f"{split_col}={v!r}; expected train/valid/test" for v in raw[bad]])
        keep &= ~bad
        out["source_split"] = raw
    else:
        out["split"] = None

    if class_col:
        space, values, bad, details = _class_labels(df[class_col], classes)
    else:
        space, values, bad, details = _numeric_labels(df, list(label_cols), task)
    if bad.any():
        skip_rows(skipped, rel[bad & keep], "unknown_label_value", [d for d, k in zip(details, keep[bad]) if k])
    keep &= ~bad
    for j, name in enumerate(space.names):
        out[name] = values[:, j]

    if check_files:
        keep = drop_missing_files(keep, out["path"], rel, skipped, root)
    return finish("csv", out.loc[keep], space, skipped, {"csv": str(csv), "root": root_abs})


def _numeric_labels(df: pd.DataFrame, cols: list[str], task: str):
    space = LabelSpace(tuple(cols), task)
    values = np.zeros((len(df), len(cols)), dtype=np.float32)
    bad_cells: dict[str, np.ndarray] = {}
    for j, c in enumerate(cols):
        vals, nonnum = parse_numbers(df[c])
        # Soft targets are fine; -1 (CheXpert "uncertain") or 2 are not: use the chexpert source.
        out_of_range = ~np.isnan(vals) & ((vals < 0) | (vals > 1))
        bad_cells[c] = nonnum | out_of_range
        values[:, j] = vals
    bad = np.zeros(len(df), dtype=bool)
    for m in bad_cells.values():
        bad |= m
    not_one_hot = np.zeros(len(df), dtype=bool)
    if task == MULTICLASS and len(cols):
        labelled = ~np.isnan(values).all(axis=1)
        not_one_hot = labelled & ~bad & ~np.isclose(np.nansum(values, axis=1), 1.0)
    rows = np.flatnonzero(bad | not_one_hot)
    details = [
        "a multiclass row needs exactly one 1" if not_one_hot[r] else d + " (labels must be numbers in [0, 1] or blank)"
        for r, d in zip(rows, describe_bad_cells(df, bad_cells, rows))
    ]
    return space, values, bad | not_one_hot, details


def _class_labels(col: pd.Series, classes: Sequence[str] | None):
    vals = col.astype(str).str.strip()
    present = sorted(set(vals) - {""})
    names = tuple(classes) if classes else tuple(present)
    space = LabelSpace(names, MULTICLASS)
    index = {n: i for i, n in enumerate(names)}
    idx = vals.map(index)
    bad = ((vals != "") & idx.isna()).to_numpy()
    values = np.zeros((len(col), len(names)), dtype=np.float32)
    ok = idx.notna().to_numpy()
    values[np.flatnonzero(ok), idx[ok].astype(int).to_numpy()] = 1.0
    values[(vals == "").to_numpy()] = np.nan
    details = [f"class {v!r} not in {list(names)}" for v in vals[bad]]
    return space, values, bad, details


# ----------------------------------------------------------------------------- load_folder


def load_folder(
    root: str | Path,
    *,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    recursive: bool = True,
) -> SourceResult:
    """Every image file under `root`, unlabelled (empty label space): input for scoring.

    Each image is its own patient; hidden files are ignored, other non-image files are
    reported as skipped (`not_an_image`).
    """
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"{root}: not a folder; pass the folder that holds the images")
    exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    skipped = Skipped()
    rels: list[str] = []
    for f in walk_files(root, recursive=recursive):  # symlinked folders followed once, hidden names skipped
        if f.problem:  # an undecodable name, a named pipe: nothing a manifest can hold or a reader open
            skipped.add(f.rel, f.problem, f.detail)
        elif f.name.lower().endswith(exts):
            rels.append(f.rel)
        else:
            skipped.add(f.rel, "not_an_image", f"extension not in {list(exts)}")
    root_abs = os.path.abspath(root)
    df = pd.DataFrame({"image_id": pd.Series(rels, dtype=str)})
    df["path"] = root_abs + "/" + df["image_id"]
    df["patient_id"] = df["image_id"]
    df["study_id"] = None
    df["view"] = None
    df["split"] = None
    return finish("folder", df, LabelSpace(()), skipped, {"root": root_abs})
