"""Every path a user gives, local or a URI, through one helper over `pyarrow.fs`.

    storage.write_json("s3://bucket/runs/x/info.json", {...})
    storage.read_parquet("runs/manifest.parquet")

A path is either local (NFS mounts included) or a URI that pyarrow understands (`s3://`,
`gs://`, `hdfs://`; `file://` is turned into a local path). pyarrow is Ray's own choice, so
cxrray, Ray Train's `storage_path` and Ray Data read the same stores with the same
credentials (the standard AWS/GCP environment, e.g. `AWS_ENDPOINT_URL` for MinIO).

Two properties the rest of cxrray builds on:

* `write_bytes` is atomic: a file exists whole or not at all. Locally that is a temp file,
  fsync and rename; on an object store a single PUT (or a completed multipart upload) already
  is, and there is no rename to lean on, so nothing here ever renames on a URI.
* Nothing is ever written to a local folder named like a URI (`s3:/bucket/...` is what
  `Path("s3://bucket")` makes): `local_path` refuses such names.
"""
from __future__ import annotations

import json
import os
import threading
import uuid
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

# Local names that can only come from a URI mangled by Path(): "s3://b/x" -> "s3:/b/x".
_URI_LIKE_PREFIXES = ("s3:", "gs:", "gcs:", "hdfs:", "abfs:", "az:", "file:")
_CREDENTIAL_HINTS = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or an instance/pod role), "
          "and AWS_ENDPOINT_URL for MinIO or another S3-compatible server",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file (or use workload identity)",
}


class StorageError(RuntimeError):
    """A store cannot be used as given (no bucket, no credentials, a mangled URI); the message
    is one line naming the path and the fix."""


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def scheme(path: str | os.PathLike) -> str:
    """'s3', 'gs', ... for URIs; '' for local paths."""
    p = os.fspath(path)
    return p.split("://", 1)[0].lower() if is_uri(p) else ""


def normalize(path: str | os.PathLike) -> str:
    """A local path made absolute (resolved against the cwd, `~` expanded), a `file://` URI made
    local, any other URI returned as it is (minus a trailing slash)."""
    p = os.fspath(path)
    if p.startswith("models:/"):  # an MLflow registry URI (cxrray.tracking resolves it), not a path
        return p
    if p.startswith("file://"):
        p = urlsplit(p).path
    if is_uri(p):
        base, sep, query = p.partition("?")
        return base.rstrip("/") + sep + query
    return str(local_path(p))


def local_path(path: str | os.PathLike) -> Path:
    """The absolute local path; refuses names that are really mangled URIs."""
    p = Path(os.fspath(path)).expanduser()
    first = p.parts[0] if p.parts else ""
    if first.lower().startswith(_URI_LIKE_PREFIXES) and first.endswith(":"):
        raise StorageError(f"{os.fspath(path)!r} looks like a URI that lost a slash; write it as "
                           f"{first}//{'/'.join(p.parts[1:])}")
    return p.resolve()


def join(base: str | os.PathLike, *parts: str) -> str:
    """base/part/...; for URIs a '/' join that keeps any `?query` (endpoint, region) at the end."""
    b = os.fspath(base)
    if not is_uri(b):
        return os.path.join(b, *parts)
    head, sep, query = b.partition("?")
    joined = "/".join([head.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return joined + sep + query


def name(path: str | os.PathLike) -> str:
    return PurePosixPath(os.fspath(path).partition("?")[0].rstrip("/")).name


# ------------------------------------------------------------------------------- filesystems

_fs_cache: dict[tuple[str, str, str], pafs.FileSystem] = {}
_fs_lock = threading.Lock()


def filesystem(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it). Object-store filesystems are cached per bucket:
    building one resolves credentials and the region, which costs a round trip."""
    p = os.fspath(path)
    if not is_uri(p) or p.startswith("file://"):
        return pafs.LocalFileSystem(), str(local_path(normalize(p)))
    parts = urlsplit(p)
    key = (parts.scheme.lower(), parts.netloc, parts.query)
    if key[0] not in ("s3", "gs", "gcs"):
        try:
            return pafs.FileSystem.from_uri(p)
        except (pa.ArrowInvalid, OSError) as e:
            raise StorageError(f"{p}: cannot open this URI ({e})") from e
    with _fs_lock:
        fs = _fs_cache.get(key)
        if fs is None:
            try:
                fs, _ = pafs.FileSystem.from_uri(p)
            except (pa.ArrowInvalid, OSError) as e:
                raise StorageError(f"{p}: cannot open this URI ({_first_line(e)})") from e
            _fs_cache[key] = fs
    return fs, f"{parts.netloc}{parts.path}".rstrip("/")


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


# ---------------------------------------------------------------------------------- queries


def info(path: str | os.PathLike) -> pafs.FileInfo:
    fs, p = filesystem(path)
    return fs.get_file_info(p)


def exists(path: str | os.PathLike) -> bool:
    return info(path).type != pafs.FileType.NotFound


def is_file(path: str | os.PathLike) -> bool:
    return info(path).type == pafs.FileType.File


def is_dir(path: str | os.PathLike) -> bool:
    return info(path).type == pafs.FileType.Directory


def list_dir(path: str | os.PathLike) -> list[str]:
    """Names of the direct children (files and folders); [] for a missing folder."""
    fs, p = filesystem(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    return sorted(PurePosixPath(f.path).name for f in fs.get_file_info(pafs.FileSelector(p)))


def list_files(path: str | os.PathLike) -> list[tuple[str, int]]:
    """(path relative to `path`, size) of every file below it, recursively, sorted."""
    fs, p = filesystem(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    out = []
    for f in fs.get_file_info(pafs.FileSelector(p, recursive=True)):
        if f.type == pafs.FileType.File:
            out.append((PurePosixPath(f.path).relative_to(PurePosixPath(p)).as_posix(), f.size))
    return sorted(out)


# ----------------------------------------------------------------------------- read / write


def read_bytes(path: str | os.PathLike) -> bytes:
    fs, p = filesystem(path)
    try:
        with fs.open_input_stream(p) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{os.fspath(path)}: no such file") from None


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode()


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(read_bytes(path))


def write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """Atomic: readers see the old content or the new, never a part."""
    p = os.fspath(path)
    if not is_uri(p):
        target = local_path(p)
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_local_atomic(target, lambda f: f.write(data))
        return str(target)
    fs, inner = filesystem(p)
    with fs.open_output_stream(inner) as f:  # one object PUT: atomic on S3/GCS
        f.write(data)
    return p


def _write_local_atomic(target: Path, write) -> None:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> str:
    return write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj: Any) -> str:
    return write_text(path, json.dumps(obj, indent=2, default=str))


def write_parquet(table: pa.Table, path: str | os.PathLike) -> str:
    """One Parquet file, atomically (see write_bytes)."""
    p = os.fspath(path)
    if not is_uri(p):
        target = local_path(p)
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_local_atomic(target, lambda f: pq.write_table(table, f))
        return str(target)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return write_bytes(p, sink.getvalue().to_pybytes())


def read_parquet(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    fs, p = filesystem(path)
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{os.fspath(path)}: no such file")
    return pq.read_table(p, filesystem=fs, columns=columns)


def parquet_file(path: str | os.PathLike) -> pq.ParquetFile:
    fs, p = filesystem(path)
    return pq.ParquetFile(fs.open_input_file(p))


def open_input(path: str | os.PathLike):
    """A seekable binary file object (for pandas, PIL, pydicom)."""
    fs, p = filesystem(path)
    return fs.open_input_file(p)


def delete(path: str | os.PathLike, *, missing_ok: bool = True) -> None:
    fs, p = filesystem(path)
    try:
        fs.delete_file(p)
    except FileNotFoundError:
        if not missing_ok:
            raise


def delete_dir(path: str | os.PathLike) -> None:
    fs, p = filesystem(path)
    if fs.get_file_info(p).type == pafs.FileType.Directory:
        fs.delete_dir(p)


def makedirs(path: str | os.PathLike) -> None:
    """Local folders are created; object stores have no folders (a no-op there)."""
    if not is_uri(path):
        local_path(path).mkdir(parents=True, exist_ok=True)


# ------------------------------------------------------------------------- whole directories


def upload_dir(local_dir: str | os.PathLike, dest: str | os.PathLike, *, last: tuple[str, ...] = ()) -> str:
    """Copy a local folder's files to `dest` (local or URI), each file atomically; the names in
    `last` go after all others, so a reader that keys on them (model.json) sees the rest first."""
    src = Path(local_dir)
    files = sorted((p for p in src.rglob("*") if p.is_file()), key=lambda p: (p.name in last, str(p)))
    for f in files:
        write_bytes(join(dest, f.relative_to(src).as_posix()), f.read_bytes())
    return os.fspath(dest)


def download_dir(src: str | os.PathLike, local_dir: str | os.PathLike) -> Path:
    out = Path(local_dir)
    for rel, _ in list_files(src):
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(read_bytes(join(src, rel)))
    return out


def copy_file(src: str | os.PathLike, dest: str | os.PathLike) -> str:
    return write_bytes(dest, read_bytes(src))


def check_store(path: str | os.PathLike, *, what: str = "path") -> None:
    """Fail before any work when `path` cannot be used: a local name that is a mangled URI, a
    bucket that does not exist, missing or refused credentials. One line, with the fix."""
    p = os.fspath(path)
    if p.startswith("models:/"):
        return  # resolved (and its errors reported) by cxrray.tracking
    if not is_uri(p):
        local_path(p)
        return
    sch = scheme(p)
    bucket = urlsplit(p).netloc
    if sch in ("s3", "gs", "gcs") and not bucket:
        raise StorageError(f"{what} {p}: no bucket in the URI; write it as {sch}://BUCKET/prefix")
    fs, _ = filesystem(p)
    try:
        bucket_info = fs.get_file_info(bucket) if bucket else None
    except OSError as e:
        raise StorageError(_classify(p, what, e)) from None
    if bucket_info is not None and bucket_info.type == pafs.FileType.NotFound:
        raise StorageError(f"{what} {p}: bucket {bucket!r} does not exist (or these credentials cannot see it); "
                           f"create it (e.g. `aws s3 mb {sch}://{bucket}`) or fix the URI")


def check_target(path: str | os.PathLike, *, folder: bool, what: str = "output") -> None:
    """Fail before any work when a local output cannot be made where asked: a folder wanted
    where a file is (or a file where a folder is), or a file somewhere up its path. One line,
    instead of a FileExistsError or NotADirectoryError from deep inside the job. URIs pass."""
    p = os.fspath(path)
    if is_uri(p):
        return
    target = Path(local_path(p)).expanduser().absolute()
    try:
        _check_target(p, target, folder, what)
    except PermissionError as e:
        raise StorageError(f"{what} {p}: {e.strerror or e} on {e.filename or target}") from None


def _check_target(p: str, target: Path, folder: bool, what: str) -> None:
    if target.exists():
        if folder and not target.is_dir():
            raise StorageError(f"{what} {p}: is a file; give a folder")
        if not folder and target.is_dir():
            raise StorageError(f"{what} {p}: is a folder; give a file name in it")
        return
    above = next((q for q in target.parents if q.exists()), None)
    if above is not None and not above.is_dir():
        raise StorageError(f"{what} {p}: {above} is a file, so nothing can be made under it")


def _classify(p: str, what: str, e: OSError) -> str:
    text = _first_line(e)
    low = text.lower()
    sch = scheme(p)
    if any(k in low for k in ("access_denied", "accessdenied", "access denied", "forbidden", "403",
                              "invalidaccesskeyid", "signaturedoesnotmatch", "credential", "expiredtoken")):
        hint = _CREDENTIAL_HINTS.get("gs" if sch in ("gs", "gcs") else sch, "check the store's credentials")
        return f"{what} {p}: the store refused the credentials ({text}); {hint}"
    return f"{what} {p}: the store cannot be reached ({text}); check the endpoint and network"
