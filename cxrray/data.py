"""Ray Data glue: manifest -> Dataset -> decode -> resize -> augment -> batch dicts.

Batches are {"image": uint8 [N,1,S,S], "labels": float32 [N,K]}; normalisation happens in
the model. "labels" are targets: the manifest's cells through a `TargetMap` (the training
policy for the train split, the validation policy for valid), applied in the decode tasks. Two inputs: raw files (decoded each epoch) or Parquet shards written once by
`prepare_shards` (decoded and resized), which skip the per-file open/decode cost.
"""
from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import ray

from cxrray import storage
from PIL import Image

from cxrray.imaging import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageError
from cxrray.labels import LabelSpace, TargetMap, UncertaintyConfig
from cxrray.transforms import Augment, Preprocess, augment_native, load_resized, resize_native, to_uint8

log = logging.getLogger(__name__)

SHARD_ROWS = 1000
SHARD_INFO = "shards.json"


def _label_matrix(batch: dict, label_cols: Sequence[str], targets: TargetMap | None) -> np.ndarray:
    n = len(batch["path"]) if "path" in batch else len(batch["image_id"])
    if not label_cols:
        return np.zeros((n, 0), np.float32)
    cells = np.stack([np.asarray(batch[c], dtype=np.float32) for c in label_cols], axis=1)
    return targets(cells) if targets is not None else cells


def _targets(space: LabelSpace, targets: TargetMap | None) -> TargetMap:
    """The caller's map, else the default training policy (U-Zeros, blank zero): raw -1 never
    reaches a loss."""
    return targets if targets is not None else TargetMap.training(space, UncertaintyConfig())


def _keep_good(images: list, labels: np.ndarray, errors: list[str], size: int) -> dict:
    """Unreadable files become a logged error record and leave the batch (training can't use them)."""
    for e in errors:
        log.warning("skipping unreadable training image: %s", e)
    keep = [i for i, im in enumerate(images) if im is not None]
    out = {
        "image": np.stack([images[i] for i in keep]) if keep else np.zeros((0, 1, size, size), np.uint8),
        "labels": labels[keep] if len(labels) else np.zeros((0, labels.shape[1]), np.float32),
    }
    return out


def decode_files(batch: dict, *, pre: Preprocess, aug: Augment | None, label_cols: Sequence[str],
                 targets: TargetMap | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    rng = np.random.default_rng()
    images, errors = [], []
    for path in batch["path"]:
        try:
            # The same decode as scoring and Serve (predict.decode_one): JPEG draft, integer resize.
            images.append(load_resized(str(path), pre, aug=aug, rng=rng, max_pixels=max_pixels,
                                       max_bytes=max_bytes)[0])
        except ImageError as e:
            images.append(None)
            errors.append(f"{e.reason}: {e}")
    return _keep_good(images, _label_matrix(batch, label_cols, targets), errors, pre.size)


def decode_shard_rows(batch: dict, *, pre: Preprocess, aug: Augment | None, label_cols: Sequence[str],
                      targets: TargetMap | None = None) -> dict:
    rng = np.random.default_rng()
    size = pre.size
    images = []
    for raw, s in zip(batch["pixels"], batch["size"]):
        img = np.frombuffer(raw, dtype=np.uint8).reshape(int(s), int(s))
        if aug is None and s == size:
            images.append(img[None])
        elif aug is None:
            images.append(resize_native(Image.fromarray(img), size)[None])
        else:
            images.append(to_uint8(augment_native(Image.fromarray(img), size, aug, rng))[None])
    return _keep_good(images, _label_matrix(batch, label_cols, targets), [], size)


MAX_ROWS_PER_TASK = 256


def _rows_per_task(n_rows: int, batch_size: int) -> int:
    """Rows per decode task: at least two tasks per cluster CPU (load balance, as Ray Data's own
    read parallelism does), otherwise as many rows as possible, up to MAX_ROWS_PER_TASK.

    Each Ray task carries a fixed cost (scheduling, object-store round trip): ~20 ms on a busy
    2-core machine, as much as decoding 20-40 Kermany JPEGs. Tasks of one training batch
    (32 rows) cost ~30% of the raw-JPEG throughput (benchmarks/results/data.md).
    """
    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else (os.cpu_count() or 1)
    return int(max(1, min(MAX_ROWS_PER_TASK, max(batch_size, math.ceil(n_rows / (2 * max(1, cpus)))))))


@contextmanager
def _context_set(name: str, value) -> Iterator[None]:
    """Datasets built inside get DataContext.<name> = value; the current context is restored after.

    A Ray dataset keeps a copy of the context it was built with, and every dataset derived from
    it keeps that copy, so the setting follows the pipeline and nothing else. An older Ray without
    the setting builds with its defaults.
    """
    ctx = ray.data.DataContext.get_current()
    if not hasattr(ctx, name):
        yield
        return
    previous = getattr(ctx, name)
    setattr(ctx, name, value)
    try:
        yield
    finally:
        setattr(ctx, name, previous)


def files_dataset(df: pd.DataFrame, space: LabelSpace, pre: Preprocess, aug: Augment | None,
                  batch_size: int = 32, *, shuffle: bool = False, seed: int | None = None,
                  targets: TargetMap | None = None) -> ray.data.Dataset:
    """Raw image files -> batch dicts; labels through `targets` (default: U-Zeros, blank zero).
    One block per decode task, sized by `_rows_per_task`, so decoding spreads over all CPUs. `batch_size` is the smallest task; training re-batches.

    shuffle (training): the rows are permuted once and the blocks re-ordered every epoch; the
    train loop's local shuffle buffer then mixes neighbouring blocks. Without it a manifest in
    folder order (Kermany's: every NORMAL, then every PNEUMONIA) trains on one class at a time.
    """
    cols = ["image_id", "path", *space.columns]
    frame = df[cols].reset_index(drop=True)
    if shuffle:
        frame = frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    rows = _rows_per_task(len(frame), batch_size)
    n_blocks = max(1, math.ceil(len(frame) / rows))
    bounds = np.linspace(0, len(frame), n_blocks + 1).astype(int)
    parts = [frame.iloc[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    # Every free CPU for the decode tasks from the first block on. Ray Data's resource reservation
    # (on by default in 2.60) keeps half of the cluster per operator for the operators downstream;
    # this pipeline has none (blocks of paths -> one map), so on a 2-CPU node it ran its decode
    # tasks one at a time: NIH PNGs at 123 img/s against a 2-worker DataLoader's 196, and 172-185
    # with the reservation off (benchmarks/results/data.md, 2026-12-07). Scoring's pipeline (decode
    # tasks feeding a Predictor actor pool) is built elsewhere and keeps the reservation.
    with _context_set("op_resource_reservation_enabled", False):
        ds = ray.data.from_pandas(parts)
    if shuffle:
        ds = ds.randomize_block_order()  # blocks of paths: cheap; a new order each execution (epoch)
    return ds.map_batches(decode_files, batch_size=rows, batch_format="numpy",
                          fn_kwargs={"pre": pre, "aug": aug, "label_cols": list(space.columns),
                                     "targets": _targets(space, targets)})


def _read_shards(split_dir: str, shuffle: str | None = None) -> ray.data.Dataset:
    """read_parquet through Ray Data's V1 Parquet datasource.

    Since Ray 2.60 the default (V2) reader lists files on every execution, i.e. every epoch,
    with a fresh pool of RAY_DATA_PARQUET_FOOTER_NUM_ACTORS (32) footer-reading actors, sized
    for object stores. On our few local shards that is seconds of process start-up per epoch
    (2-7 s on 2 cores, where the V1 reader streams 1,000 images in 0.4 s; see
    benchmarks/results/data.md). V1 reads the footers once, here on the driver.
    """
    with _context_set("use_datasource_v2", False):  # older Ray: V1 is the only reader
        return ray.data.read_parquet(str(split_dir), shuffle=shuffle)


def shards_dataset(shards_dir: str | Path, split: str, space: LabelSpace, pre: Preprocess,
                   aug: Augment | None, batch_size: int = 32, *, shuffle: bool = False,
                   targets: TargetMap | None = None) -> ray.data.Dataset:
    """Parquet shards (which keep the manifest's cells) -> batch dicts; labels through `targets`.
    shuffle (training): shard files in a new order every epoch; rows were shuffled when the shards were written, and the train loop's local buffer mixes."""
    split_dir = storage.join(storage.normalize(shards_dir), split)
    if not storage.is_dir(split_dir):
        raise FileNotFoundError(f"{split_dir}: no shards for split {split!r}; run `cxrray prepare` first")
    info = read_shard_info(shards_dir)
    if info["size"] < pre.size:
        raise ValueError(f"shards in {shards_dir} are {info['size']} px, smaller than the model's {pre.size} px")
    # The reservation stays on here: with a read operator before the decode, it is
    # what keeps the reads from taking every CPU (without it, 5,216 Kermany shards rows took 330 s
    # for one epoch instead of 1.8 s, 2026-12-07).
    ds = _read_shards(split_dir, shuffle="files" if shuffle else None)
    rows = _rows_per_task(int(info["images"].get(split, 0)), batch_size)
    return ds.map_batches(decode_shard_rows, batch_size=rows, batch_format="numpy",
                          fn_kwargs={"pre": pre, "aug": aug, "label_cols": list(space.columns),
                                     "targets": _targets(space, targets)})


# --- prepare: decode + resize once into ~1k-image Parquet shards ----------------------------------


@dataclass(frozen=True)
class ShardInfo:
    size: int
    label_space: dict
    shards: dict  # split -> number of shards
    images: dict  # split -> images written
    errors: dict  # split -> unreadable files skipped


def _write_shard(rows: pd.DataFrame, space_cols: list[str], size: int, out_file: str) -> tuple[int, list[str]]:
    pre = Preprocess(size=size, channels=1)
    pixels, keep, errors = [], [], []
    for i, path in enumerate(rows["path"]):
        try:
            pixels.append(load_resized(str(path), pre)[0][0].tobytes())
            keep.append(i)
        except ImageError as e:
            errors.append(f"{e.reason}: {e}")
    kept = rows.iloc[keep]
    table = pa.table({
        "image_id": kept["image_id"].astype(str).tolist(),
        "pixels": pa.array(pixels, type=pa.binary()),
        "size": pa.array([size] * len(kept), type=pa.int32()),
        **{c: pa.array(kept[c].to_numpy(np.float32)) for c in space_cols},
    })
    storage.write_parquet(table, out_file)  # atomic: a crashed prepare never leaves half a shard
    return len(kept), errors


def prepare_shards(df: pd.DataFrame, space: LabelSpace, out_dir: str | Path, *, size: int,
                   rows_per_shard: int = SHARD_ROWS, progress: bool = True, seed: int = 0) -> ShardInfo:
    """One Ray task per shard; existing shards are kept, so a re-run finishes what is missing.

    Rows are shuffled (seeded, so a re-run cuts the same shards) before they are cut into
    shards: a manifest in folder order would otherwise give single-class shards, which no
    file-level shuffle at training time can mix.
    """
    out_dir = storage.normalize(out_dir)  # local, NFS or a bucket prefix
    write = ray.remote(num_cpus=1)(_write_shard)
    futures, meta = [], []
    for split, part in df.groupby(df["split"].fillna("unsplit")):
        storage.makedirs(storage.join(out_dir, split))
        part = part.sample(frac=1.0, random_state=seed).reset_index(drop=True)
        for k, start in enumerate(range(0, len(part), rows_per_shard)):
            out_file = storage.join(out_dir, split, f"shard-{k:05d}.parquet")
            rows = part.iloc[start:start + rows_per_shard]
            if storage.exists(out_file):
                meta.append((split, len(rows), []))
                continue
            futures.append((split, write.remote(rows, list(space.columns), size, out_file)))
    from cxrray.console import Progress

    # A bar on a terminal, a log line every N seconds otherwise (job logs).
    with Progress("prepare shards", len(futures), unit="shard", rate_unit="img", enabled=progress) as bar:
        for split, fut in futures:
            n, errs = ray.get(fut)
            meta.append((split, n, errs))
            bar.update(1, amount=n)
    shards, images, errors = {}, {}, {}
    for split, n, errs in meta:
        shards[split] = shards.get(split, 0) + 1
        images[split] = images.get(split, 0) + n
        errors[split] = errors.get(split, 0) + len(errs)
    info = ShardInfo(size, space.to_dict(), shards, images, errors)
    storage.write_json(storage.join(out_dir, SHARD_INFO), asdict(info))
    return info


def read_shard_info(shards_dir: str | Path) -> dict:
    path = storage.join(storage.normalize(shards_dir), SHARD_INFO)
    if not storage.is_file(path):
        raise FileNotFoundError(f"{path} missing: {shards_dir} was not written by `cxrray prepare`")
    return storage.read_json(path)
