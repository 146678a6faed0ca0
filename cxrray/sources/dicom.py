"""A folder tree of DICOM files -> manifest, from headers only (pydicom's stop_before_pixels).

    load_dicom("/archive/cxr", labels_csv="labels.csv", join_on="SOPInstanceUID")

Every file under `root` is opened (names and extensions do not matter: PACS exports often
have none); hidden files and folders are ignored. Per image: image_id = path relative to
root, path absolute (or the URI), patient_id = sha256(salt + PatientID)[:16] in hex,
study_id = StudyInstanceUID, view = ViewPosition (PA, AP, LATERAL, LL, RL, else None), and
sop_uid, series_uid, modality, body_part. Files that are not DICOM (`not_dicom`), DICOM
objects without pixel data such as RT plans, SRs or a DICOMDIR (`not_an_image`), and files
that cannot be parsed or end before their pixel data (`unreadable`) are reported in Skipped.
check_pixels=True also decodes every image (cxrray.imaging) and skips those that fail.

PHI: PatientID is read only to be hashed, inside the worker that read the header; PatientName,
BirthDate and AccessionNumber never leave it (the accession number is used only to join
labels). Only UIDs, modality, body part and view travel, as in cxrray.dicom.IDENTITY_KEYWORDS.

The salt: the `salt` option, else $CXRRAY_PATIENT_SALT, else DEFAULT_SALT, a fixed public
constant. Fixed, not random and not derived from the root, so the same patient gets the same
id on every run, machine and archive: patient splits stay stable when a manifest is rebuilt,
and the leakage check still sees a patient who appears in two archives. A public salt does not
stop someone who already holds a PatientID from confirming it (IDs are short enough to guess),
so for real archives set CXRRAY_PATIENT_SALT to a site secret (a warning says so once).

Without labels_csv the label space is empty (as `folder`: input for scoring). With it, label
columns parse as in the csv source (numbers in [0, 1], blank = no supervision) and join on
SOPInstanceUID (one row per image) or AccessionNumber (one row per study: every image of the
study gets it); images without a row are skipped as `no_label_row` (cxrray.sources.dicom_labels).
"""
from __future__ import annotations

import hashlib
import logging
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import BinaryIO, Sequence

import pandas as pd
import pydicom
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from cxrray import storage
from cxrray.files import walk_files
from cxrray.imaging import ImageError, bare_dicom_start, load_image_info, sniff_format
from cxrray.labels import MULTILABEL, LabelSpace
from cxrray.manifest import ManifestError, Skipped, SourceResult
# The labels join has its own module; JOIN_KEYS stays importable from here too.
from cxrray.sources.dicom_labels import JOIN_KEYS, join_labels
from cxrray.sources.generic import finish

log = logging.getLogger(__name__)

SALT_ENV = "CXRRAY_PATIENT_SALT"
DEFAULT_SALT = "cxrray-patient-id-v1"
EXTRA_COLUMNS: tuple[str, ...] = ("sop_uid", "series_uid", "modality", "body_part")
# What the header read keeps; with stop_before_pixels pydicom seeks past everything else.
HEADER_TAGS: tuple[str, ...] = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "AccessionNumber",
    "Modality", "ViewPosition", "BodyPartExamined", "Rows", "Columns",
)
VIEWS: dict[str, str] = {"PA": "PA", "AP": "AP", "LL": "LL", "RL": "RL", "LATERAL": "LATERAL", "LAT": "LATERAL"}
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
_PREFIX = 64 * 1024  # read at once; CR/DX headers are a few KiB (a VOI LUT adds 8)
_warned_default_salt = False


class _Skip(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, " ".join(detail.split())


@dataclass(frozen=True)
class _Header:
    """What leaves a worker: hashed patient, UIDs and acquisition fields; no PHI in clear."""

    patient_id: str | None
    study_id: str
    sop_uid: str
    series_uid: str
    modality: str
    view: str | None
    body_part: str
    accession: str  # only for the label join; dropped before the manifest


def patient_hash(patient_id: str, salt: str) -> str:
    """sha256(salt + PatientID), first 16 hex digits (64 bits: no collision below ~10^9 patients)."""
    return hashlib.sha256((salt + patient_id).encode("utf-8")).hexdigest()[:16]


def resolve_salt(salt: str | None) -> tuple[str, str]:
    """(salt, where it came from: option/env/default); see the module docstring for why."""
    global _warned_default_salt
    if salt:
        return salt, "option"
    if os.environ.get(SALT_ENV):
        return os.environ[SALT_ENV], "env"
    if not _warned_default_salt:
        _warned_default_salt = True
        log.warning("patient ids are hashed with cxrray's public default salt; for real archives set %s to a "
                    "site secret (the same one every time, or splits change)", SALT_ENV)
    return DEFAULT_SALT, "default"


def normalise_view(value: str) -> str | None:
    return VIEWS.get(value.strip().upper())


# ----------------------------------------------------------------------------- header reading


def read_header(path: str, salt: str, *, check_pixels: bool = False) -> _Header:
    """One file's header (raise _Skip with the reason); local path or URI."""
    try:
        header = _read_uri(path, salt) if storage.is_uri(path) else _read_local(path, salt)
    except OSError as e:
        raise _Skip("unreadable", f"cannot read the file ({e.strerror or type(e).__name__})") from None
    if check_pixels:
        try:
            load_image_info(path)
        except ImageError as e:
            raise _Skip("unreadable", f"{e.reason}: {e.detail}") from None
    return header


def _read_local(path: str, salt: str) -> _Header:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        # One read into memory, then parse there: pydicom calls tell() and read() a few hundred
        # times per header, which costs more on a buffered file than the bytes do.
        prefix = f.read(_PREFIX)
        if len(prefix) == size:
            return _parse(BytesIO(prefix), size, salt)
        try:
            return _parse(BytesIO(prefix), size, salt, partial=True)
        except _NeedMore:  # a header longer than the prefix: read on from the file itself
            f.seek(0)
            return _parse(f, size, salt)


def _read_uri(uri: str, salt: str) -> _Header:
    size = storage.info(uri).size
    with storage.open_input(uri) as f:
        prefix = f.read(_PREFIX)  # one ranged request
    if len(prefix) < size:
        try:
            return _parse(BytesIO(prefix), size, salt, partial=True)
        except _NeedMore:
            pass
    return _parse(BytesIO(storage.read_bytes(uri)), size, salt)


class _NeedMore(Exception):
    """The prefix of an object ended before its pixel data: read it whole."""


def _parse(f: BinaryIO, size: int, salt: str, partial: bool = False) -> _Header:
    head = f.read(132)
    if not head:
        raise _Skip("unreadable", "empty file (0 bytes)")
    force = False
    start = 0
    if head[128:132] != b"DICM":
        head += f.read(4096)
        found = bare_dicom_start(head)
        if found is None:
            fmt = sniff_format(head)
            what = f"a {fmt.upper()} file" if fmt else "no 'DICM' at byte 128 and no data set at its start"
            raise _Skip("not_dicom", f"not DICOM ({what})")
        start, force = found, True
    f.seek(start)
    if start:  # pydicom rewinds to 0 on a preamble-less file: hand it the data set alone
        f, size = BytesIO(f.read()), size - start
    try:
        ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=list(HEADER_TAGS), force=force)
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for one bad byte
        if partial:
            raise _NeedMore from e
        # The type only: pydicom's messages may quote header values, and a value may be PHI.
        raise _Skip("unreadable", f"cannot parse the DICOM header ({type(e).__name__})") from None
    pixels = _pixel_element(f, ds, size)
    if pixels is None and partial:
        raise _NeedMore
    if "Rows" not in ds and pixels is None:
        sop = UID(_text(ds, "SOPClassUID"))
        what = f"SOP class {sop.name} ({sop})" if sop else "no SOP Class UID"
        raise _Skip("not_an_image", f"DICOM object without pixel data ({what})")
    if pixels is None:
        raise _Skip("unreadable", f"image attributes but no Pixel Data element: the file ends before its "
                                  f"pixel data (truncated at {size:,} bytes, or the pixels were stripped)")
    if pixels > size:
        raise _Skip("unreadable", f"truncated DICOM (read {size:,} of {pixels:,} bytes)")
    if "Rows" not in ds or "Columns" not in ds:
        raise _Skip("unreadable", "corrupt DICOM (pixel data without Rows/Columns)")
    return _header(ds, salt)


def _pixel_element(f: BinaryIO, ds, size: int) -> int | None:
    """Where the pixel data would end (file size if undefined/unknown), or None if the file holds none.

    stop_before_pixels leaves the file at the Pixel Data element's tag; reading its 12-byte
    header tells a complete image from one cut short without reading a single pixel.
    """
    syntax = ds.file_meta.get("TransferSyntaxUID") if ds.file_meta is not None else None
    if syntax == DeflatedExplicitVRLittleEndian:
        return size if "Rows" in ds else None  # pydicom read an inflated copy; offsets are not ours
    pos = f.tell()
    raw = f.read(12)
    if len(raw) < 8:
        return None
    implicit, little = ds.original_encoding
    endian = "<" if little is not False else ">"
    group, elem = struct.unpack(endian + "HH", raw[:4])
    if (group << 16 | elem) not in _PIXEL_TAGS:
        return None
    if implicit:
        (length,), header = struct.unpack(endian + "I", raw[4:8]), 8
    elif raw[4:6] in (b"OB", b"OW", b"OF", b"OD", b"OL", b"UN") and len(raw) == 12:
        (length,), header = struct.unpack(endian + "I", raw[8:12]), 12
    else:
        (length,), header = struct.unpack(endian + "H", raw[6:8]), 8
    if length == 0xFFFFFFFF:  # encapsulated: fragments follow; the decoder checks them
        return size
    return pos + header + length


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _header(ds, salt: str) -> _Header:
    pid = _text(ds, "PatientID")
    return _Header(
        patient_id=patient_hash(pid, salt) if pid else None,
        study_id=_text(ds, "StudyInstanceUID"),
        sop_uid=_text(ds, "SOPInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        modality=_text(ds, "Modality").upper(),
        view=normalise_view(_text(ds, "ViewPosition")),
        body_part=_text(ds, "BodyPartExamined").upper(),
        accession=_text(ds, "AccessionNumber"),
    )


def _list(root: str, skipped: Skipped) -> list[tuple[str, str]]:
    """(image_id, path) of every non-hidden file under root, sorted; a local file that cannot be
    read as one (cxrray.files: an undecodable name, a named pipe) goes to `skipped` instead."""
    if storage.is_uri(root):
        rels = [r for r, _ in storage.list_files(root) if not any(p.startswith(".") for p in r.split("/"))]
        return [(r, storage.join(root, r)) for r in rels]
    out = []
    for f in walk_files(root):
        if f.problem:
            skipped.add(f.rel, f.problem, f.detail)
        else:
            out.append((f.rel, f.path))
    return sorted(out)


def read_headers(root: str, salt: str, *, check_pixels: bool = False, max_workers: int | None = None,
                 ) -> tuple[list[tuple[str, str, _Header]], Skipped]:
    """Headers of every file under `root` in a thread pool (the work is mostly waiting on I/O)."""
    skipped = Skipped()
    files = _list(root, skipped)
    workers = max_workers or min(32, 4 * (os.cpu_count() or 1))

    def chunk(items: list[tuple[str, str]]) -> list[tuple[str, str, _Header | _Skip]]:
        out = []
        for rel, path in items:
            try:
                out.append((rel, path, read_header(path, salt, check_pixels=check_pixels)))
            except _Skip as s:
                out.append((rel, path, s))
        return out

    # Chunks of 32 files per task: a future per file costs more than a small local header.
    chunks = [files[i : i + 32] for i in range(0, len(files), 32)]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dicom-header") as pool:
        results = [r for part in pool.map(chunk, chunks) for r in part]
    good = []
    for rel, path, h in results:
        if isinstance(h, _Skip):
            skipped.add(rel, h.reason, h.detail)
        else:
            good.append((rel, path, h))
    return good, skipped


# ----------------------------------------------------------------------------- load_dicom


def load_dicom(
    root: str | Path,
    *,
    labels_csv: str | Path | None = None,
    join_on: str = "SOPInstanceUID",
    label_cols: Sequence[str] | None = None,
    task: str = MULTILABEL,
    salt: str | None = None,
    check_pixels: bool = False,
    max_workers: int | None = None,
) -> SourceResult:
    """Manifest of every DICOM image under `root` (see the module docstring)."""
    t0 = time.perf_counter()
    root_s = storage.normalize(root)
    if not storage.is_dir(root_s):
        raise ManifestError(f"{root}: not a folder; pass the folder that holds the DICOM files")
    if join_on not in JOIN_KEYS:
        raise ManifestError(f"join_on must be one of {list(JOIN_KEYS)}, got {join_on!r}")
    salt_value, salt_from = resolve_salt(salt)
    headers, skipped = read_headers(root_s, salt_value, check_pixels=check_pixels, max_workers=max_workers)
    seconds = time.perf_counter() - t0
    headers = _drop_duplicate_sops(headers, skipped)
    df = _frame(headers)
    no_pid = int(df["patient_id"].isna().sum())
    if no_pid:
        # One study is one patient: the safest grouping left when the PatientID is blank.
        log.warning("%d images have no PatientID; each is grouped with its study (StudyInstanceUID)", no_pid)
        fallback = df["study_id"].where(df["study_id"] != "", df["sop_uid"]).where(lambda s: s != "", df["image_id"])
        df["patient_id"] = df["patient_id"].fillna(fallback.map(lambda u: patient_hash("study:" + u, salt_value)))
    info = {"root": root_s, "files": len(headers) + len(skipped), "header_seconds": round(seconds, 3),
            "salt": salt_from, "no_patient_id": no_pid, "check_pixels": check_pixels}
    if labels_csv is None:
        space = LabelSpace(())
    else:
        df, space, join_info = join_labels(df, labels_csv, join_on, label_cols, task, skipped)
        info.update(join_info)
    df = df.drop(columns=["accession"])
    rate = f"headers {len(headers) + len(skipped):,} in {seconds:.1f}s"
    return finish("dicom", df, space, skipped, info, extra=rate)


def _drop_duplicate_sops(headers: list, skipped: Skipped) -> list:
    """Copies of one image (same SOPInstanceUID) count once: the first by path."""
    first: dict[str, str] = {}
    out = []
    for rel, path, h in headers:
        if h.sop_uid in first:
            skipped.add(rel, "duplicate_id", f"same SOPInstanceUID as {first[h.sop_uid]}")
            continue
        if h.sop_uid:
            first[h.sop_uid] = rel
        out.append((rel, path, h))
    return out


def _frame(headers: list) -> pd.DataFrame:
    cols = ["image_id", "path", "patient_id", "study_id", "view", "split", *EXTRA_COLUMNS, "accession"]
    rows = [(rel, path, h.patient_id, h.study_id, h.view, None, h.sop_uid, h.series_uid, h.modality,
             h.body_part, h.accession) for rel, path, h in headers]
    return pd.DataFrame(rows, columns=cols, dtype=object)  # paths are absolute: root was normalised
