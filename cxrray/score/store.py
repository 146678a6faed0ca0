"""The predictions output: part files plus commit records, exactly once on any store.

Object stores (S3, GCS) have no rename, so a part cannot be "committed" by renaming it into
place. The protocol needs only what every store has: a single object write is atomic.

1. A complete chunk of results is written as `part-NNNNN-<sha8>.parquet`, named by its index
   and its content's hash, so no two writers (a live run and a zombie) ever write one name.
2. Then its commit record `_commits/part-NNNNN-<sha8>.json` is written: part name, rows,
   bytes, sha256, model id, run id. **A part counts once its record exists.**
3. Readers and resume trust committed parts only. On resume, a part with no record (the run
   died between 1 and 2), a record whose part is missing or of another size, and any local
   temp file are deleted, and their images are scored again. Committed parts are never
   rewritten.

Locally (and on NFS) step 1 is additionally a temp file + rename, so even a plain
`pd.read_parquet(out)` never meets half a file. Names starting with `_` or `.` are skipped by
pandas/pyarrow/Spark readers, so `pd.read_parquet(out)` sees only parts (an uncommitted one
can show up only in the moment after a killed run and before the next one cleans up;
`read_predictions` never shows it).

One writer at a time: a local output holds an flock (the kernel drops it when the holder
dies); an object store gets a lease object `_lock.json` that the writer refreshes, and that
a new run may take over when it has expired or its owner's process is gone (cxrray.score.lock).
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cxrray import storage
from cxrray.qa import IDENTITY_FIELDS
from cxrray.score.errors import OutputConflict, ScoreError
# Re-exported: the lock lived here, and cxrray.score and cxrray.score.pipeline import it from here.
from cxrray.score.lock import LEASE, LEASE_TTL_S, LOCK, OutputLock  # noqa: F401

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
COMMITS = "_commits"
FORMAT = "cxrray-predictions/2"
FORMAT_V1 = "cxrray-predictions/1"  # parts committed by rename, no records: still read
PART_RE = re.compile(r"^part-(\d+)(?:-([0-9a-f]{8}))?\.parquet$")
META_MODEL = b"cxrray.model_id"
META_SPACE = b"cxrray.label_space"


def output_schema(prob_columns: Iterable[str]) -> pa.Schema:
    """The predictions contract, as written to every part."""
    return pa.schema(
        [("image_id", pa.string()), ("path", pa.string())]
        + [(c, pa.float32()) for c in prob_columns]
        + [("positive", pa.list_(pa.string())), ("model_id", pa.string()), ("error", pa.string())]
        # What a hospital needs to use the scores: the DICOM identity (null for PNG/JPEG; UIDs,
        # never patient data) and QA warnings (cxrray.qa).
        + [(c, pa.string()) for c in IDENTITY_FIELDS] + [("warnings", pa.list_(pa.string()))]
    )


def to_contract(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Cast a result batch to the contract schema; failed rows get null (not NaN) probabilities."""
    error = table["error"].cast(pa.string())
    ok = pc.is_null(error)
    p0 = next((f.name for f in schema if f.name.startswith("p_")), None)
    if p0 and table[p0].null_count and pc.any(pc.and_(ok, pc.is_null(table[p0]))).as_py():
        # Every row must carry probabilities or a reason; anything else is a bug upstream.
        raise ScoreError(f"a result row has neither probabilities nor an error (model {table['model_id'][0]})")
    cols = []
    for f in schema:
        if f.name not in table.column_names and (f.name in IDENTITY_FIELDS or f.name == "warnings"):
            # Optional QA fields: null identity, no warnings (e.g. rows from an older Predictor).
            cols.append(pa.nulls(table.num_rows, f.type) if f.name != "warnings"
                        else pa.array([[]] * table.num_rows, f.type))
            continue
        col = error if f.name == "error" else table[f.name].cast(f.type)
        if f.name.startswith("p_"):
            col = pc.if_else(ok, col, pa.scalar(None, pa.float32()))
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=schema)


# ------------------------------------------------------------------------------- the folder


@dataclass(frozen=True)
class Listing:
    """What is in an output folder right now."""

    parts: dict[str, int]  # part name -> index
    sizes: dict[str, int]  # part name -> bytes
    commits: dict[str, dict]  # part name -> its commit record
    other: list[str]  # anything else (besides our own _ and . names)
    version: str | None  # the _manifest.json format, if any


def list_output(out: str) -> Listing:
    parts, sizes, other = {}, {}, []
    files = storage.list_files(out)
    for rel, size in files:
        if "/" in rel:
            if not rel.startswith((COMMITS + "/", ".")):
                other.append(rel)
            continue
        m = PART_RE.match(rel)
        if m:
            parts[rel], sizes[rel] = int(m.group(1)), size
        elif not rel.startswith(("_", ".")):
            other.append(rel)
    commits = {}
    for rel, _ in files:
        if rel.startswith(COMMITS + "/") and rel.endswith(".json"):
            try:
                rec = storage.read_json(storage.join(out, rel))
                commits[rec["part"]] = rec
            except (ValueError, KeyError, OSError) as e:  # a torn record is no record
                log.warning("%s/%s is unreadable (%s); ignoring it", out, rel, e)
    doc = read_manifest_json(out)
    return Listing(parts, sizes, commits, other, doc.get("format") if doc else None)


def committed_parts(out: str, listing: Listing | None = None) -> dict[int, str]:
    """index -> part path of every committed part (format 1 folders: every part)."""
    listing = listing or list_output(out)
    legacy = listing.version == FORMAT_V1 and not listing.commits
    return {i: storage.join(out, n) for n, i in sorted(listing.parts.items())
            if legacy or (n in listing.commits and listing.commits[n].get("bytes") == listing.sizes[n])}


def read_manifest_json(out: str) -> dict | None:
    try:
        return storage.read_json(storage.join(out, MANIFEST))
    except FileNotFoundError:
        return None


def write_manifest_json(out: str, doc: dict) -> None:
    storage.write_json(storage.join(out, MANIFEST), doc)


@dataclass
class OutputState:
    done: set[str]  # image_ids with a committed row
    next_part: int


def _remove_uncommitted(out: str, listing: Listing) -> None:
    if not storage.is_uri(out):
        for n in storage.list_dir(out):
            if n.startswith(".") and ".tmp-" in n:  # a dead run's half-written temp file; we hold the lock
                storage.delete(storage.join(out, n))
    good = set(committed_parts(out, listing).values())
    for n in listing.parts:
        if storage.join(out, n) not in good:
            log.warning("%s/%s was never committed (a run died before its commit record); deleting it, its "
                        "images will be scored again", out, n)
            storage.delete(storage.join(out, n))
    for n in listing.commits:
        if storage.join(out, n) not in good:
            storage.delete(storage.join(out, COMMITS, f"{n[:-len('.parquet')]}.json"))


def _migrate_v1(out: str, listing: Listing) -> None:
    """A format-1 folder's parts were committed by rename: give each readable one its record,
    so that new parts (which have records) and old ones are read alike from now on."""
    for n in sorted(listing.parts):
        try:
            rows = storage.parquet_file(storage.join(out, n)).metadata.num_rows
        except Exception:  # noqa: BLE001 - unreadable: left without a record, so it is deleted and redone
            continue
        storage.write_json(storage.join(out, COMMITS, f"{n[:-len('.parquet')]}.json"),
                           {"part": n, "rows": rows, "bytes": listing.sizes[n], "migrated_from": FORMAT_V1})
    doc = read_manifest_json(out)
    if doc:
        write_manifest_json(out, {**doc, "format": FORMAT})


def refuse_foreign_output(out: str) -> None:
    """OutputConflict when `out` holds files that are not a predictions folder's (read only)."""
    out = storage.normalize(out)
    if not storage.exists(out):
        return
    names = [rel for rel, _ in storage.list_files(out)]  # names only: no commit record is read
    ours = any(PART_RE.match(n) for n in names) or MANIFEST in names
    other = [n for n in names if not n.startswith(("_", ".")) and not PART_RE.match(n)]
    if other and not ours:
        raise OutputConflict(f"{out} is not empty and is not a predictions folder ({other[:3]}); choose a new --out")


def scan_output(out: str, model_id: str, schema: pa.Schema, *, force_model: bool) -> OutputState:
    """Validate what an earlier run left and return the ids already scored.

    Uncommitted and unreadable parts (a crash mid-write, a full disk) are deleted and redone;
    another model's output is refused, or deleted with force_model."""
    out = storage.normalize(out)
    if not storage.exists(out):
        return OutputState(set(), 0)
    listing = list_output(out)
    prev = read_manifest_json(out)
    if prev is None and not listing.parts:
        refuse_foreign_output(out)
        return OutputState(set(), 0)
    if listing.version == FORMAT_V1 and not listing.commits:
        _migrate_v1(out, listing)
        listing = list_output(out)
    _remove_uncommitted(out, listing)
    parts = committed_parts(out, list_output(out))
    owners = {prev["model_id"]} if prev else set()
    done: dict[str, int] = {}
    for i, f in sorted(parts.items()):
        try:
            pf = storage.parquet_file(f)
            owner = (pf.schema_arrow.metadata or {}).get(META_MODEL, b"").decode()
            ids = pf.read(columns=["image_id"]).column(0).to_pylist()
        except Exception as e:  # noqa: BLE001 - any unreadable part is simply redone
            log.warning("%s is unreadable (%s); deleting it, its images will be rescored", f, e)
            _delete_part(out, f)
            continue
        owners.add(owner)
        if owner == model_id and pf.schema_arrow.remove_metadata() != schema:
            raise OutputConflict(f"{f} has columns {pf.schema_arrow.names}, not this model's; choose a new --out")
        for x in ids:
            if x in done:
                raise OutputConflict(f"{x!r} has rows in {storage.name(f)} and part {done[x]}; the folder was "
                                     "edited by hand")
            done[x] = i
    others = owners - {model_id}
    if others:
        if not force_model:
            raise OutputConflict(f"{out} holds predictions of model {sorted(others)[0]}, not {model_id}; "
                                 "score into a new --out, or pass --force-model to replace them")
        log.warning("--force-model: deleting %d parts of model %s in %s", len(parts), sorted(others), out)
        for f in list(committed_parts(out).values()):
            _delete_part(out, f)
        storage.delete(storage.join(out, MANIFEST))
        return OutputState(set(), 0)
    all_indices = list(list_output(out).parts.values())
    return OutputState(set(done), max(all_indices, default=-1) + 1)


def _delete_part(out: str, part: str) -> None:
    storage.delete(storage.join(out, COMMITS, storage.name(part)[:-len(".parquet")] + ".json"))
    storage.delete(part)


def read_index(out: str) -> pd.DataFrame:
    """image_id + error of every committed row (for the final check and the summary)."""
    return read_predictions(out, columns=["image_id", "error"])


def read_predictions(out: str, columns: list[str] | None = None) -> pd.DataFrame:
    """The committed predictions of an output folder (local or URI), as one frame."""
    tables = [storage.read_parquet(f, columns=columns) for _, f in sorted(committed_parts(storage.normalize(out))
                                                                         .items())]
    if not tables:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in (columns or ["image_id", "error"])})
    return pa.concat_tables(tables, promote_options="default").to_pandas()


def check_output(index: pd.DataFrame, inputs: pd.DataFrame) -> dict[str, int]:
    want, have = set(inputs["image_id"]), index["image_id"]
    return {"missing": len(want - set(have)), "extra": len(set(have) - want),
            "duplicates": int(have.duplicated().sum())}


# ------------------------------------------------------------------------------- the writer


class PartWriter:
    """Routes result rows to their chunk and commits each complete chunk as one part."""

    def __init__(self, out: str, todo_ids: list[str], chunk_size: int, first_part: int,
                 schema: pa.Schema, model_id: str, label_space: dict, run_id: str = ""):
        self.out, self.schema, self.first_part = storage.normalize(out), schema, first_part
        self.model_id, self.run_id = model_id, run_id or uuid.uuid4().hex[:12]
        self.bounds = todo_ids[::chunk_size]  # first id of each chunk (todo_ids is sorted)
        self.sizes = [min(chunk_size, len(todo_ids) - i) for i in range(0, len(todo_ids), chunk_size)]
        self.pending: dict[int, list[pa.Table]] = {}
        self.seen: dict[int, set[str]] = {}
        self.written: set[int] = set()
        self.meta = {META_MODEL: model_id.encode(), META_SPACE: json.dumps(label_space).encode()}
        self.rows_written = self.parts_written = self.duplicates = 0

    def add(self, table: pa.Table) -> int:
        """Take one result batch; returns how many new rows it brought."""
        table = to_contract(table, self.schema)
        chunk_of = [bisect.bisect_right(self.bounds, i) - 1 for i in table["image_id"].to_pylist()]
        new = 0
        for k, idx in _group(chunk_of).items():
            if k in self.written:  # a retried batch re-sent rows of a chunk already committed
                self.duplicates += len(idx)
                continue
            seen = self.seen.setdefault(k, set())
            ids = table["image_id"].take(idx).to_pylist()
            keep = [j for j, i in zip(idx, ids) if i not in seen]
            self.duplicates += len(idx) - len(keep)
            seen.update(ids)
            if keep:
                self.pending.setdefault(k, []).append(table.take(keep))
                new += len(keep)
            if len(seen) == self.sizes[k]:
                self._write(k)
        return new

    def _write(self, k: int) -> None:
        table = pa.concat_tables(self.pending.pop(k, [])).sort_by("image_id")
        sink = pa.BufferOutputStream()
        pq.write_table(table.replace_schema_metadata(self.meta), sink)
        data = sink.getvalue().to_pybytes()
        digest = hashlib.sha256(data).hexdigest()
        stem = f"part-{self.first_part + k:05d}-{digest[:8]}"
        storage.write_bytes(storage.join(self.out, f"{stem}.parquet"), data)  # 1. the part
        storage.write_json(storage.join(self.out, COMMITS, f"{stem}.json"),  # 2. its commit record
                           {"part": f"{stem}.parquet", "rows": table.num_rows, "bytes": len(data), "sha256": digest,
                            "model_id": self.model_id, "run": self.run_id,
                            "committed": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        self.seen.pop(k, None)
        self.written.add(k)
        self.rows_written += table.num_rows
        self.parts_written += 1

    def flush(self) -> None:
        """Write partial chunks (after a failure): their rows are valid and need no rescoring."""
        for k in list(self.pending):
            self._write(k)


def _group(keys: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for j, k in enumerate(keys):
        out.setdefault(k, []).append(j)
    return out
