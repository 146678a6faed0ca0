"""What to score: a folder tree, a glob, a CSV/Parquet list (a cxrray manifest included), or
a URI prefix (s3://...), listed once into a table of unique `image_id`s in one fixed order.

The `image_id` is the path relative to the input root, so a re-mounted archive still resumes.
"""
from __future__ import annotations

import glob
import hashlib
import io
import logging
import os
import posixpath
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Iterable

import pandas as pd
import pyarrow.fs as pafs

from cxrray import storage
from cxrray.files import BAD_NAME, readable, walk_files
from cxrray.score.errors import InputError

log = logging.getLogger(__name__)

# Extension-less names are included too: PACS exports name DICOM files by number or UID
# (`IM000123`, `1.2.840.113619.2.55.3.1`), whose "suffix" is empty or digits. Anything that is
# then not an image gets a `not_an_image` row, never a silent skip.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom"})
# Pictures by name that cxrray does not read: leaving them out of a listing is worth a warning.
OTHER_PICTURES = frozenset({".tif", ".tiff", ".bmp", ".gif", ".webp", ".jp2", ".j2k", ".jpx", ".heic", ".dcm.gz", ".gz"})
SKIP_NAMES = frozenset({"DICOMDIR"})  # the DICOM media index, not an image
TABLE_SUFFIXES = (".csv", ".parquet")


def is_image_name(name: str) -> bool:
    if name.startswith(".") or name in SKIP_NAMES:
        return False
    suffix = PurePosixPath(name).suffix.lower()
    return suffix in IMAGE_EXTENSIONS or suffix == "" or suffix[1:].isdigit()


def _frame(ids: Iterable[str], paths: Iterable[str], problems: Iterable[str | None] | None = None) -> pd.DataFrame:
    df = pd.DataFrame({"image_id": list(ids), "path": list(paths)}, dtype=object)
    df["problem"] = list(problems) if problems is not None else None
    return df


def _list_dir(root: Path, exclude: str | None = None) -> pd.DataFrame:
    """cxrray.files.walk_files: symlinked folders followed once, hidden names skipped, and files
    that cannot be scored (an undecodable name, a named pipe) kept with their problem: they
    become error rows. `exclude`: a folder under root left out (the job's own --out)."""
    ids, paths, problems = [], [], []
    left_out: Counter = Counter()
    for f in walk_files(root, exclude=exclude):
        if not is_image_name(f.name):
            left_out[PurePosixPath(f.name).suffix.lower() or f.name] += 1
            continue
        ids.append(f.rel)
        paths.append(readable(os.path.abspath(f.path)) if f.problem else f.path)
        problems.append(f"{f.problem}: {f.detail}" if f.problem else None)
    if left_out:  # by name, so no row: say so, or a folder of TIFFs looks scored
        pictures = any(k in OTHER_PICTURES for k in left_out)  # a warning when they are pictures, not notes
        log.log(logging.WARNING if pictures else logging.INFO, "%s: left out %d files whose names are not images "
                "cxrray reads (%s)", root, sum(left_out.values()), ", ".join(f"{k} {n}" for k, n in left_out.most_common(6)))
    return _frame(ids, paths, problems)


def _list_glob(pattern: str) -> pd.DataFrame:
    parts = Path(pattern).parts
    fixed = next((i for i, s in enumerate(parts) if glob.has_magic(s)), len(parts))
    root = Path(*parts[:fixed]) if fixed else Path(".")
    files = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    return _frame((Path(p).relative_to(root).as_posix() for p in files), (os.path.abspath(p) for p in files))


def _list_uri(uri: str) -> pd.DataFrame:
    base, _, query = uri.partition("?")
    scheme = base.split("://", 1)[0]
    fs, root = storage.filesystem(uri)
    info = fs.get_file_info(root)
    suffix = f"?{query}" if query else ""
    if info.type == pafs.FileType.File:
        return _frame([PurePosixPath(root).name], [uri])
    if info.type != pafs.FileType.Directory:
        raise InputError(f"{uri}: no such file or folder")
    ids, paths = [], []
    for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        rel = PurePosixPath(f.path).relative_to(root)
        if f.type == pafs.FileType.File and is_image_name(rel.name) and not any(
            s.startswith(".") for s in rel.parts
        ):
            ids.append(rel.as_posix())
            paths.append(f"{scheme}://{f.path}{suffix}")
    return _frame(ids, paths)


def _list_table(path: str) -> pd.DataFrame:
    """A CSV with a `path` column (relative paths are relative to the CSV) or any Parquet with
    one, e.g. a cxrray manifest; an `image_id` column is used when present. Local or a URI."""
    try:
        if storage.name(path).lower().endswith(".parquet"):
            pf = storage.parquet_file(path)
            names = pf.schema_arrow.names
            df = pf.read(columns=[c for c in ("image_id", "path") if c in names]).to_pandas()
        else:
            src = io.BytesIO(storage.read_bytes(path)) if storage.is_uri(path) else path
            df = pd.read_csv(src, dtype=str, keep_default_na=False)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, OSError) as e:  # ArrowInvalid is a ValueError
        if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, IsADirectoryError)):
            raise  # a store that failed, not a malformed table: the caller's error
        kind = "Parquet" if storage.name(path).lower().endswith(".parquet") else "a UTF-8 CSV"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: cannot be read as {kind} ({reason})") from None
    for key in ("path", "image_id"):  # a CSV's header in any case: Path, PATH
        named = [c for c in df.columns if c.lower() == key]
        if len(named) > 1:
            raise InputError(f"{path}: columns {named} all mean {key!r}; keep one")
    df = df.rename(columns={c: c.lower() for c in df.columns if c.lower() in ("path", "image_id")})
    if "path" not in df.columns:
        raise InputError(f"{path}: needs a 'path' column (found {list(df.columns)[:8]})")
    blank = df["path"].isna() | (df["path"].astype(str).str.strip() == "")
    if blank.any():
        raise InputError(f"{path}: {int(blank.sum())} rows have no path, e.g. row {int(blank.idxmax()) + 2}")
    given = df["path"].astype(str)
    if storage.is_uri(path):
        parent = posixpath.dirname(path.partition("?")[0])
        resolved = [p if "://" in p or p.startswith("/") else storage.join(parent, p) for p in given]
    else:
        here = Path(path).parent
        # normpath: a/./x.png and a/x.png are one file, listed once
        resolved = [p if "://" in p else os.path.normpath(p) if os.path.isabs(p) else str((here / p).resolve())
                    for p in given]
    if "image_id" in df.columns:
        return _frame(df["image_id"].astype(str), resolved)
    # Without ids, a file named twice (a/./x.png, a/x.png) is one image, under its first name.
    return _frame(given, resolved).drop_duplicates("path").reset_index(drop=True)


def _is_table(spec: str) -> bool:
    return storage.name(spec).lower().endswith(TABLE_SUFFIXES)


def list_inputs(spec: str, exclude: str | None = None) -> pd.DataFrame:
    """image_id + path for every image the input names, unique ids, sorted by image_id, and
    `problem` ("reason: detail", or None): a file listed that cannot be read (see _list_dir).
    exclude: a local folder never listed (the job's own output, when it is inside the input)."""
    exclude = os.path.realpath(exclude) if exclude and not storage.is_uri(exclude) else None
    if storage.is_uri(spec) and not spec.startswith("file://"):
        df = _list_table(spec) if _is_table(spec) and storage.is_file(spec) else _list_uri(spec)
    elif spec.startswith("file://"):
        df = _list_uri(spec)
    elif glob.has_magic(spec) and not Path(spec).expanduser().exists():  # "batch[1]" may be a folder's own name
        df = _flag_bad_names(_list_glob(spec))
    else:
        p = Path(spec).expanduser()
        if p.is_dir():
            df = _list_dir(p.resolve(), exclude)
        elif p.is_file() and _is_table(spec):
            df = _list_table(str(p))
        elif p.is_file():
            df = _flag_bad_names(_frame([p.name], [str(p.resolve())]))
        else:
            raise InputError(f"{spec}: no such file or folder")
    df = df.drop_duplicates(["image_id", "path"])
    clash = df["image_id"].duplicated(keep=False)
    if clash.any():
        ex = df[clash].sort_values("image_id").head(2)
        raise InputError(f"{spec}: image_id {ex['image_id'].iloc[0]!r} names two files "
                         f"({', '.join(ex['path'])}); give each image a unique image_id")
    if df.empty:
        raise InputError(f"{spec}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}"
                         " and extension-less files)")
    # Python's string order, the one bisect uses to route result rows back to their chunk.
    ids = df["image_id"].tolist()
    return df.iloc[sorted(range(len(ids)), key=ids.__getitem__)].reset_index(drop=True)


def _flag_bad_names(df: pd.DataFrame) -> pd.DataFrame:
    """Ids or paths that are not valid UTF-8, shown readable and flagged. Only a glob or a named
    file can hold them: a folder's walk flags its own, and CSV, Parquet and URI listings are UTF-8."""
    shown_ids, shown_paths = df["image_id"].map(readable), df["path"].map(readable)
    bad = (shown_ids != df["image_id"]) | (shown_paths != df["path"])
    if not bad.any():
        return df
    df = df.copy()
    df.loc[bad, "problem"] = f"{BAD_NAME}: the file name is not valid UTF-8 (another encoding, e.g. Latin-1); " \
                             "rename it to score it"
    df["image_id"], df["path"] = shown_ids, shown_paths
    return df


def fingerprint(inputs: pd.DataFrame) -> str:
    h = hashlib.sha256()
    for i, p in zip(inputs["image_id"], inputs["path"]):
        h.update(f"{i}\0{p}\n".encode())
    return h.hexdigest()[:16]
