"""Bulk scoring: an archive of images -> predictions Parquet, resumable and fault tolerant.

    python -m cxrray.score --artifact runs/x/artifacts/best --input /archive --out preds/

Design (why it survives a SIGKILL at any point):

* The input (folder tree, glob, CSV/Parquet manifest, or a pyarrow URI such as s3://) is
  listed once into a table of unique `image_id`s (the path relative to the input root, so
  a re-mounted archive still resumes) sorted in one fixed order.
* Images with no row in the output yet are split into fixed chunks (`--chunk-size`). Ray
  Data streams their paths through `map_batches(Predictor, ActorPoolStrategy)` (decoding in
  the actors, or in a separate CPU task stage); the driver collects the result rows and,
  when a chunk is complete, writes it as `part-NNNNN.parquet` to a hidden temp name, fsyncs
  and renames it: a part either exists whole or not at all.
* A re-run lists the input again, reads the `image_id` column of every part (cheap) and
  scores only what is missing, into new parts. No image is ever in two parts, so the output
  never has a duplicate, and the final check compares the output to the input id for id.
* `_manifest.json` records the model, label space, chunk size and an input fingerprint for
  every run; `_lock` (flock) stops two drivers writing into one folder. Both start with `_`,
  and temp files with `.`, so `pd.read_parquet(out)` sees only the parts: exactly the
  predictions contract (image_id, path, p_<class>..., positive, model_id, error).
* One bad file is one row with null probabilities and `error = "<reason>: <detail>"`
  (reason in imaging.REASONS); a killed Ray worker is restarted by Ray Data and its batch
  retried; rows that arrive twice are dropped by image_id.

Refusals: an output folder written by another model (unless `--force-model`, which deletes
that model's parts and rescores everything: one folder always holds one model's
predictions), an output holding rows for images no longer in the input (score into a new
folder), or a non-empty folder that is not a predictions folder.
"""
from __future__ import annotations

import argparse
import bisect
import fcntl
import glob
import hashlib
import json
import logging
import math
import os
import re
import signal
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cxrray.imaging import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from cxrray.predict import Predictor, decode_batch

log = logging.getLogger(__name__)

# Extension-less names are included too: PACS exports name DICOM files by number or UID
# (`IM000123`, `1.2.840.113619.2.55.3.1`), whose "suffix" is empty or digits. Anything that is
# then not an image gets a `not_an_image` row, never a silent skip.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom"})
SKIP_NAMES = frozenset({"DICOMDIR"})  # the DICOM media index, not an image
DEFAULT_CHUNK = 1024
MANIFEST = "_manifest.json"
LOCK = "_lock"
FORMAT = "cxrray-predictions/1"
PART_RE = re.compile(r"^part-(\d+)\.parquet$")
META_MODEL = b"cxrray.model_id"
META_SPACE = b"cxrray.label_space"


class ScoreError(RuntimeError):
    """The job cannot start or finish; the message says what to do."""


class InputError(ScoreError):
    """The input names no images, or names them inconsistently."""


class OutputConflict(ScoreError):
    """The output folder holds something this run must not mix with."""


@dataclass(frozen=True)
class ScoreConfig:
    artifact: str
    input: str
    out: str
    batch_size: int = 32
    chunk_size: int = DEFAULT_CHUNK
    actors: int | None = None  # default: fill the cluster (CPUs // cpus_per_actor, or GPUs)
    cpus_per_actor: float = 1.0
    gpus_per_actor: float | None = None  # default: 1 when the cluster has GPUs, else 0
    decode: str = "auto"  # "actor", "task" (separate CPU stage) or auto: task with GPUs
    force_model: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    ray_address: str | None = None


# --------------------------------------------------------------------------- input listing


def is_image_name(name: str) -> bool:
    if name.startswith(".") or name in SKIP_NAMES:
        return False
    suffix = PurePosixPath(name).suffix.lower()
    return suffix in IMAGE_EXTENSIONS or suffix == "" or suffix[1:].isdigit()


def _frame(ids: Iterable[str], paths: Iterable[str]) -> pd.DataFrame:
    return pd.DataFrame({"image_id": list(ids), "path": list(paths)}, dtype=object)


def _list_dir(root: Path) -> pd.DataFrame:
    ids, paths = [], []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        for f in files:
            if is_image_name(f):
                p = os.path.join(d, f)
                ids.append(Path(p).relative_to(root).as_posix())
                paths.append(p)
    return _frame(ids, paths)


def _list_glob(pattern: str) -> pd.DataFrame:
    parts = Path(pattern).parts
    fixed = next((i for i, s in enumerate(parts) if glob.has_magic(s)), len(parts))
    root = Path(*parts[:fixed]) if fixed else Path(".")
    files = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    return _frame((Path(p).relative_to(root).as_posix() for p in files), (os.path.abspath(p) for p in files))


def _list_uri(uri: str) -> pd.DataFrame:
    import pyarrow.fs as pafs

    base, _, query = uri.partition("?")
    scheme = base.split("://", 1)[0]
    fs, root = pafs.FileSystem.from_uri(uri)
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


def _list_table(path: Path) -> pd.DataFrame:
    """A CSV with a `path` column (relative paths are relative to the CSV) or any Parquet with
    one, e.g. a cxrray manifest; an `image_id` column is used when present."""
    if path.suffix.lower() == ".parquet":
        names = pq.read_schema(path).names
        df = pq.read_table(path, columns=[c for c in ("image_id", "path") if c in names]).to_pandas()
    else:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        df = df.rename(columns={c: c.lower() for c in df.columns if c.lower() in ("path", "image_id")})
    if "path" not in df.columns:
        raise InputError(f"{path}: needs a 'path' column (found {list(df.columns)[:8]})")
    blank = df["path"].isna() | (df["path"].astype(str).str.strip() == "")
    if blank.any():
        raise InputError(f"{path}: {int(blank.sum())} rows have no path, e.g. row {int(blank.idxmax()) + 2}")
    given = df["path"].astype(str)
    resolved = [p if "://" in p or os.path.isabs(p) else str((path.parent / p).resolve()) for p in given]
    ids = df["image_id"].astype(str) if "image_id" in df.columns else given
    return _frame(ids, resolved)


def list_inputs(spec: str) -> pd.DataFrame:
    """image_id + path for every image the input names, unique ids, sorted by image_id."""
    if "://" in spec:
        df = _list_uri(spec)
    elif glob.has_magic(spec):
        df = _list_glob(spec)
    else:
        p = Path(spec).expanduser()
        if p.is_dir():
            df = _list_dir(p.resolve())
        elif p.is_file() and p.suffix.lower() in (".csv", ".parquet"):
            df = _list_table(p)
        elif p.is_file():
            df = _frame([p.name], [str(p.resolve())])
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


def fingerprint(inputs: pd.DataFrame) -> str:
    h = hashlib.sha256()
    for i, p in zip(inputs["image_id"], inputs["path"]):
        h.update(f"{i}\0{p}\n".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- output folder


def output_schema(prob_columns: Iterable[str]) -> pa.Schema:
    """The predictions contract, as written to every part."""
    return pa.schema(
        [("image_id", pa.string()), ("path", pa.string())]
        + [(c, pa.float32()) for c in prob_columns]
        + [("positive", pa.list_(pa.string())), ("model_id", pa.string()), ("error", pa.string())]
    )


def part_files(out: Path) -> dict[int, Path]:
    return {int(m.group(1)): out / n for n in os.listdir(out) if (m := PART_RE.match(n))} if out.is_dir() else {}


def read_manifest_json(out: Path) -> dict | None:
    f = out / MANIFEST
    return json.loads(f.read_text()) if f.exists() else None


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


def write_manifest_json(out: Path, doc: dict) -> None:
    _write_atomic(out / MANIFEST, lambda t: t.write_text(json.dumps(doc, indent=2, default=str)))


@dataclass
class OutputState:
    done: set[str]  # image_ids with a row
    next_part: int


def scan_output(out: Path, model_id: str, schema: pa.Schema, *, force_model: bool) -> OutputState:
    """Validate what an earlier run left and return the ids already scored.

    Temp files and unreadable parts (a crash mid-write, a full disk) are deleted and redone;
    another model's output is refused, or deleted with force_model."""
    if not out.exists():
        return OutputState(set(), 0)
    for n in os.listdir(out):
        if n.startswith(".") and ".tmp-" in n:
            (out / n).unlink()  # a dead run's half-written file; we hold the lock, so no live writer owns it
    parts = part_files(out)
    prev = read_manifest_json(out)
    if prev is None and not parts:
        foreign = [n for n in os.listdir(out) if n != LOCK]
        if foreign:
            raise OutputConflict(f"{out} is not empty and is not a predictions folder ({foreign[:3]}); "
                                 "choose a new --out")
        return OutputState(set(), 0)
    owners = {prev["model_id"]} if prev else set()
    done: dict[str, int] = {}
    for i, f in sorted(parts.items()):
        try:
            pf = pq.ParquetFile(f)
            owner = (pf.schema_arrow.metadata or {}).get(META_MODEL, b"").decode()
            ids = pf.read(columns=["image_id"]).column(0).to_pylist()
        except Exception as e:  # noqa: BLE001 - any unreadable part is simply redone
            log.warning("%s is unreadable (%s); deleting it, its images will be rescored", f, e)
            f.unlink()
            continue
        owners.add(owner)
        if owner == model_id and pf.schema_arrow.remove_metadata() != schema:
            raise OutputConflict(f"{f} has columns {pf.schema_arrow.names}, not this model's; choose a new --out")
        for x in ids:
            if x in done:
                raise OutputConflict(f"{x!r} has rows in {f.name} and part {done[x]}; the folder was edited by hand")
            done[x] = i
    others = owners - {model_id}
    if others:
        if not force_model:
            raise OutputConflict(f"{out} holds predictions of model {sorted(others)[0]}, not {model_id}; "
                                 "score into a new --out, or pass --force-model to replace them")
        log.warning("--force-model: deleting %d parts of model %s in %s", len(parts), sorted(others), out)
        for f in part_files(out).values():
            f.unlink()
        (out / MANIFEST).unlink(missing_ok=True)
        return OutputState(set(), 0)
    return OutputState(set(done), max(part_files(out), default=-1) + 1)


class OutputLock:
    """An exclusive flock on out/_lock; the kernel drops it when the holder dies, even by SIGKILL."""

    def __init__(self, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / LOCK
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise OutputConflict(f"another scoring run is writing {out}; wait for it or kill it") from None

    def release(self) -> None:
        os.close(self.fd)


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
        col = error if f.name == "error" else table[f.name].cast(f.type)
        if f.name.startswith("p_"):
            col = pc.if_else(ok, col, pa.scalar(None, pa.float32()))
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=schema)


class PartWriter:
    """Routes result rows to their chunk and writes each complete chunk as one atomic part."""

    def __init__(self, out: Path, todo_ids: list[str], chunk_size: int, first_part: int,
                 schema: pa.Schema, model_id: str, label_space: dict):
        self.out, self.schema, self.first_part = out, schema, first_part
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
            if k in self.written:  # a retried batch re-sent rows of a chunk already on disk
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
        table = table.replace_schema_metadata(self.meta)
        path = self.out / f"part-{self.first_part + k:05d}.parquet"
        _write_atomic(path, lambda t: pq.write_table(table, t))
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


def read_index(out: Path) -> pd.DataFrame:
    """image_id + error of every row in the output (for the final check and the summary)."""
    tables = [pq.read_table(f, columns=["image_id", "error"]) for _, f in sorted(part_files(out).items())]
    if not tables:
        return pd.DataFrame({"image_id": pd.Series(dtype=object), "error": pd.Series(dtype=object)})
    return pa.concat_tables(tables).to_pandas()


def error_reason(error: str) -> str:
    return error.split(":", 1)[0].strip()


def check_output(index: pd.DataFrame, inputs: pd.DataFrame) -> dict[str, int]:
    want, have = set(inputs["image_id"]), index["image_id"]
    return {"missing": len(want - set(have)), "extra": len(set(have) - want),
            "duplicates": int(have.duplicated().sum())}


# --------------------------------------------------------------------------- Ray pipeline


@dataclass(frozen=True)
class Resources:
    actors: int
    cpus: float
    gpus: float
    decode: str


def plan_resources(cfg: ScoreConfig, cluster_cpus: float, cluster_gpus: float) -> Resources:
    """Actor count and per-actor resources; on CPU the default fills the cluster with
    one-thread actors (decode is single-threaded, so processes scale better than threads)."""
    gpus = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1.0 if cluster_gpus >= 1 else 0.0)
    decode = cfg.decode if cfg.decode != "auto" else ("task" if gpus else "actor")
    if cfg.actors:
        actors = cfg.actors
    elif gpus:
        actors = max(1, int(cluster_gpus // gpus))
    else:
        spare = 1 if decode == "task" else 0  # leave a CPU for the decode tasks
        actors = max(1, int((cluster_cpus - spare) // cfg.cpus_per_actor))
    if actors * cfg.cpus_per_actor > cluster_cpus:
        log.warning("%d actors x %g CPUs exceeds the cluster's %g CPUs: actors will wait for an autoscaler",
                    actors, cfg.cpus_per_actor, cluster_cpus)
    return Resources(actors, cfg.cpus_per_actor, gpus, decode)


class ContractPredictor(Predictor):
    """Predictor returning Arrow: Ray Data cannot convert the ragged `positive` lists from
    numpy (it would pickle them), and the cast then runs in the actors, not on the driver."""

    def __call__(self, batch: dict) -> pa.Table:
        rows = super().__call__(batch)
        schema = output_schema(self.prob_columns)
        cols = {f.name: pa.array(list(rows[f.name]) if f.name == "positive" else rows[f.name], type=f.type,
                                 from_pandas=True) for f in schema}
        return to_contract(pa.table(cols), schema)


def _one_cpu() -> dict:
    return {"num_cpus": 1}


def build_dataset(todo: pd.DataFrame, cfg: ScoreConfig, res: Resources, preprocess):
    import ray
    from ray.data import ActorPoolStrategy

    # Blocks of a few batches: enough tasks to keep every actor busy, few enough to be cheap.
    rows = max(cfg.batch_size, min(cfg.batch_size * 4, math.ceil(len(todo) / max(1, 4 * res.actors))))
    ds = ray.data.from_pandas([todo.iloc[i : i + rows] for i in range(0, len(todo), rows)])
    if res.decode == "task":
        # ray_remote_args_fn keeps decoding a stage of its own: with equal resources Ray Data
        # would fuse it into the actors, which is just decode="actor" with extra copies.
        ds = ds.map_batches(decode_batch, batch_size=cfg.batch_size, num_cpus=1, ray_remote_args_fn=_one_cpu,
                            fn_kwargs={"pre": preprocess, "max_pixels": cfg.max_pixels, "max_bytes": cfg.max_bytes})
    extra = {"num_gpus": res.gpus} if res.gpus else {}
    return ds.map_batches(
        ContractPredictor,
        fn_constructor_kwargs={"artifact": str(Path(cfg.artifact).resolve()), "device": "cuda" if res.gpus else "cpu",
                               "num_threads": max(1, int(res.cpus)), "max_pixels": cfg.max_pixels,
                               "max_bytes": cfg.max_bytes},
        batch_size=cfg.batch_size,
        compute=ActorPoolStrategy(size=res.actors),
        num_cpus=res.cpus,
        **extra,
    )


class Progress:
    """tqdm on a terminal; a log line every 15 s otherwise (job logs, files)."""

    def __init__(self, total: int, done_before: int):
        self.total, self.n, self.t0, self.last = total, 0, time.perf_counter(), 0.0
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc="scoring", file=sys.stderr, smoothing=0.1)
        log.info("scoring %d images (%d already in the output)", total, done_before)

    def update(self, n: int) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last >= 15 or self.n == self.total:
            self.last = now
            rate = self.n / max(now - self.t0, 1e-9)
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            log.info("scored %d/%d images (%.1f img/s, ETA %s)", self.n, self.total, rate, _hms(eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def _stream(ds) -> Iterator[pa.Table]:
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2)


def _run_pipeline(todo: pd.DataFrame, cfg: ScoreConfig, preprocess, writer: PartWriter,
                  done_before: int) -> tuple[Resources | None, float]:
    """Stream `todo` through the actors into `writer`; returns the resources used and the
    seconds to the first result (mostly actor start-up: process, torch import, model)."""
    import ray

    if not len(todo):
        return None, 0.0
    cluster = ray.cluster_resources()
    res = plan_resources(cfg, cluster.get("CPU", 1), cluster.get("GPU", 0))
    log.info("%d actors x (%g CPU, %g GPU), decode in %ss, batch %d, chunks of %d",
             res.actors, res.cpus, res.gpus, res.decode, cfg.batch_size, cfg.chunk_size)
    progress = Progress(len(todo), done_before)
    t0, first_result = time.perf_counter(), 0.0
    try:
        for batch in _stream(build_dataset(todo, cfg, res, preprocess)):
            first_result = first_result or time.perf_counter() - t0
            progress.update(writer.add(batch))
    finally:
        writer.flush()  # on failure (or SIGTERM) keep the rows already scored
        progress.close()
    return res, first_result


def summarize(out: Path, inputs: pd.DataFrame, model_id: str, writer: PartWriter, done_before: int,
              wall: float) -> dict:
    """The job summary, from the output as it now is on disk (checked id for id against the input)."""
    index = read_index(out)
    check = check_output(index, inputs)
    reasons = Counter(error_reason(e) for e in index["error"].dropna())
    return {
        "output": str(out.resolve()), "model_id": model_id, "images": len(inputs), "rows": len(index),
        "scored_this_run": writer.rows_written, "already_done": done_before,
        "errors": int(sum(reasons.values())), "errors_by_reason": dict(sorted(reasons.items())),
        "wall_s": round(wall, 3), "images_per_s": round(writer.rows_written / wall, 2) if wall > 0 else 0.0,
        "parts": len(part_files(out)), "retried_rows_dropped": writer.duplicates,
        "complete": not any(check.values()), **check,
    }


def score(cfg: ScoreConfig) -> dict:
    """Run (or finish) one scoring job; returns the summary. Needs Ray initialised."""
    from cxrray.artifact import read_meta

    t0 = time.perf_counter()
    meta = read_meta(cfg.artifact)
    schema = output_schema(meta.label_space.prob_columns)
    out = Path(cfg.out)
    inputs = list_inputs(cfg.input)
    fp = fingerprint(inputs)
    lock = OutputLock(out)
    try:
        state = scan_output(out, meta.model_id, schema, force_model=cfg.force_model)
        stale = state.done - set(inputs["image_id"])
        if stale:
            raise OutputConflict(f"{out} has rows for {len(stale)} images not in this input (e.g. "
                                 f"{sorted(stale)[0]!r}): the input changed; score into a new --out")
        todo = inputs[~inputs["image_id"].isin(state.done)].reset_index(drop=True)
        doc = read_manifest_json(out) or {
            "format": FORMAT, "model_id": meta.model_id, "architecture": meta.architecture,
            "label_space": meta.label_space.to_dict(), "columns": schema.names, "runs": []}
        run = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "artifact": str(Path(cfg.artifact).resolve()),
               "input": cfg.input, "images": len(inputs), "input_fingerprint": fp, "chunk_size": cfg.chunk_size,
               "already_done": len(state.done), "to_score": len(todo)}
        doc["runs"].append(run)
        doc["complete"] = False
        write_manifest_json(out, doc)
        writer = PartWriter(out, todo["image_id"].tolist(), cfg.chunk_size, state.next_part, schema,
                            meta.model_id, meta.label_space.to_dict())
        res, first_result = _run_pipeline(todo, cfg, meta.preprocess, writer, len(state.done))
        summary = summarize(out, inputs, meta.model_id, writer, len(state.done), time.perf_counter() - t0)
        summary.update(first_result_s=round(first_result, 3), resources=asdict(res) if res else None)
        run.update(finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), scored=writer.rows_written, wall_s=summary["wall_s"])
        doc["complete"] = summary["complete"]
        write_manifest_json(out, doc)
        return summary
    finally:
        lock.release()


# --------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser, *, json_flag: bool = True) -> argparse.ArgumentParser:
    """The score options, for this module's parser or a `cxrray score` subparser (which may
    already have --json: pass json_flag=False)."""
    p.add_argument("--artifact", required=True, help="model artifact directory (model.pt + model.json)")
    p.add_argument("--input", required=True, help="folder (recursive), glob, CSV/Parquet with a path column, or URI")
    p.add_argument("--out", required=True, help="output folder of part-*.parquet files")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK, help="images per part file (unit of resume)")
    p.add_argument("--actors", type=int, default=None, help="Predictor actors (default: fill the cluster)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="also the torch threads per actor")
    p.add_argument("--gpus-per-actor", type=float, default=None, help="default: 1 if the cluster has GPUs")
    p.add_argument("--decode", choices=("auto", "actor", "task"), default="auto",
                   help="decode inside the actors, or in a separate CPU task stage (auto: task when on GPU)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger images (too_large)")
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="refuse larger files (too_large)")
    p.add_argument("--force-model", action="store_true",
                   help="replace another model's predictions in --out (they are deleted)")
    if json_flag:
        p.add_argument("--json", action="store_true", help="print the summary as JSON on the last stdout line")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS or a local one)")
    return p


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(
        prog="cxrray score",
        description="Score an image archive into predictions Parquet (resumable: re-run the same command after a crash)."))


def config_from_args(args: argparse.Namespace) -> ScoreConfig:
    if args.batch_size < 1 or args.chunk_size < 1:
        raise SystemExit("--batch-size and --chunk-size must be >= 1")
    return ScoreConfig(args.artifact, args.input, args.out, args.batch_size, args.chunk_size, args.actors,
                       args.cpus_per_actor, args.gpus_per_actor, args.decode, args.force_model, args.max_pixels,
                       args.max_bytes, args.ray_address)


def _log_summary(s: dict) -> None:
    log.info("scored %d images this run (%d already done) in %.1fs, %.1f img/s -> %s", s["scored_this_run"],
             s["already_done"], s["wall_s"], s["images_per_s"], s["output"])
    log.info("output: %d rows for %d inputs, %d errors %s%s", s["rows"], s["images"], s["errors"],
             s["errors_by_reason"] or "", "" if s["complete"] else
             f"; INCOMPLETE (missing {s['missing']}, extra {s['extra']}, duplicates {s['duplicates']}): re-run")


def _sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through `finally`, so partial chunks are kept


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Parsed options -> exit code (0 complete, 1 incomplete, 2 refused)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(args)
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=cfg.ray_address, include_dashboard=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own progress line counts images, not blocks
    old = signal.signal(signal.SIGTERM, _sigterm) if _main_thread() else None
    try:
        summary = score(cfg)
    except ScoreError as e:
        log.error("%s", e)
        if args.json:
            print(json.dumps({"error": str(e)}), flush=True)
        return 2
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
        if started:
            ray.shutdown()  # before the JSON line: no worker log lines after it
    _log_summary(summary)
    if args.json:
        print(json.dumps(summary), flush=True)
    return 0 if summary["complete"] else 1


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
