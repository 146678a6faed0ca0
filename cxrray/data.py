"""Ray Data glue: manifest -> Dataset -> decode -> resize -> augment -> batch dicts.

Batches are {"image": uint8 [N,1,S,S], "labels": float32 [N,K]}, and a multi-pass training
dataset adds PASS (int32 [N]); normalisation happens in the model. "labels" are targets: the
manifest's cells through a `TargetMap` (the training policy for the train split, the validation
policy for valid), applied in the decode tasks. Two inputs: raw files (decoded each pass) or
Parquet shards written once by `prepare_shards` (decoded and resized), which skip the per-file
open/decode cost.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

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


def _keep_good(images: np.ndarray, kept: np.ndarray, labels: np.ndarray, errors: list[str], n: int) -> dict:
    """The decoded rows (`images`, one per index in `kept`) with their labels. Unreadable files
    leave the batch (training can't use them), with one warning per block: a moved data root makes
    every file fail, every epoch, and a line per file buried the rest."""
    if errors:
        log.warning("skipping unreadable images: %d of %d in this block; first: %s", len(errors), n, errors[0])
    return {"image": images, "labels": labels[kept] if len(labels) else np.zeros((0, labels.shape[1]), np.float32)}


def _load_each(paths: Sequence, pre: Preprocess, aug: Augment | None = None, *,
               max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES,
               ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(the model inputs of the paths that decode, uint8 [k, 1, S, S] in path order; their indices
    in `paths`; the failures' reasons).

    Each image is written straight into one array made for the block. A list of per-image arrays
    stacked at the end held every image in fresh memory twice, and the page faults on it cost
    23 us an image on Kermany's 224-px JPEGs: 158 against 135 us, decoding included
    (benchmarks/results/data.md, "fill in place").
    """
    out = np.empty((len(paths), 1, pre.size, pre.size), np.uint8)
    rng = np.random.default_rng()
    kept, errors = [], []
    for i, path in enumerate(paths):
        try:
            # The same decode as scoring and Serve (predict.decode_one): JPEG draft, integer resize.
            out[len(kept)] = load_resized(str(path), pre, aug=aug, rng=rng, max_pixels=max_pixels,
                                          max_bytes=max_bytes)[0]
            kept.append(i)
        except ImageError as e:
            errors.append(f"{e.reason}: {e}")
    return out[:len(kept)], np.asarray(kept, dtype=np.intp), errors


def decode_files(batch: dict, *, pre: Preprocess, aug: Augment | None, label_cols: Sequence[str],
                 targets: TargetMap | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    paths = batch["path"]
    images, kept, errors = _load_each(paths, pre, aug, max_pixels=max_pixels, max_bytes=max_bytes)
    return _keep_good(images, kept, _label_matrix(batch, label_cols, targets), errors, len(paths))


def decode_shard_rows(batch: dict, *, pre: Preprocess, aug: Augment | None, label_cols: Sequence[str],
                      targets: TargetMap | None = None) -> dict:
    rng = np.random.default_rng()
    size = pre.size
    images = np.empty((len(batch["pixels"]), 1, size, size), np.uint8)  # filled in place, as in _load_each
    for i, (raw, s) in enumerate(zip(batch["pixels"], batch["size"])):
        img = np.frombuffer(raw, dtype=np.uint8).reshape(int(s), int(s))
        if aug is None and s == size:
            images[i, 0] = img
        elif aug is None:
            images[i, 0] = resize_native(Image.fromarray(img), size)
        else:
            images[i, 0] = to_uint8(augment_native(Image.fromarray(img), size, aug, rng))
    return _keep_good(images, np.arange(len(images)), _label_matrix(batch, label_cols, targets), [], len(images))


# One decode task's output at most (uint8 [rows, 1, S, S]): 1,337 rows at 224 px, 256 at 512 px.
# It bounds a task's memory; the row count itself is set by the per-task cost below.
MAX_TASK_BYTES = 64 << 20


def _rows_per_task(n_rows: int, batch_size: int, size: int = 224, cpus: int | None = None, *,
                   tasks_per_cpu: int = 2) -> int:
    """Rows per decode task: `tasks_per_cpu` tasks per cluster CPU over n_rows, otherwise as many
    rows as a task's output may hold (MAX_TASK_BYTES), and never fewer than a batch.

    Each Ray task carries a fixed cost (scheduling, the object-store round trip): 20-28 ms on
    an idle 2-core machine, as much as decoding 100-140 of Kermany's 224-px JPEGs. Tasks of 256 rows
    spent a third of the raw-JPEG throughput on it (benchmarks/results/data.md). Two tasks per
    CPU balance the end of a single pass (validation, shards); across passes (training's
    `epochs`), the next pass's tasks fill the CPUs that fall idle, and one per CPU does better.
    """
    if cpus is None:
        cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else (os.cpu_count() or 1)
    most = max(batch_size, MAX_TASK_BYTES // (size * size))
    wanted = math.ceil(n_rows / (tasks_per_cpu * max(1, cpus)))
    return int(max(1, min(most, max(batch_size, wanted))))


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


def probe_files(paths: Sequence[str], pre: Preprocess) -> tuple[int, str | None]:
    """(how many of `paths` decode, the first failure's reason): a pre-flight look at a sample."""
    images, _, errors = _load_each(paths, pre)
    return len(images), (errors[0] if errors else None)


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, epoch: int, seed: int | None) -> np.ndarray:
    """The row order of one pass: a permutation drawn from (seed, epoch), identical in every
    task of that pass; None: manifest order. Cached: a worker process runs many tasks of a pass,
    and each would otherwise draw the whole permutation again for its slice (read-only)."""
    order = np.arange(n) if seed is None else np.random.default_rng([seed, epoch]).permutation(n)
    order.flags.writeable = False  # shared by every task that hits the cache
    return order


PASS = "pass"  # the column that tags each row of a multi-pass dataset with its pass


def decode_pass_blocks(batch: dict, *, paths: np.ndarray, cells: np.ndarray, bounds: np.ndarray,
                       seed: int | None, tag: bool, label_cols: Sequence[str], **decode) -> dict:
    """Task ids -> decoded rows. Task id k is block k % n_blocks of pass k // n_blocks; the
    block's rows are a slice of that pass's order (`_epoch_order`). tag: a PASS column says
    which pass each row belongs to.

    paths (UTF-8, fixed width) and cells (float32) are plain arrays, not the manifest frame:
    Ray hands them to every task from the object store without a copy, where a frame of
    Python strings would be unpickled whole by each task.
    """
    n_blocks = len(bounds) - 1
    parts = []
    for task in np.asarray(batch["id"], dtype=np.int64):
        epoch, block = divmod(int(task), n_blocks)
        rows = _epoch_order(len(paths), epoch, seed)[bounds[block]:bounds[block + 1]]
        rows_batch = {"path": np.array([p.decode("utf-8") for p in paths[rows]], dtype=object),
                      **{c: cells[rows, j] for j, c in enumerate(label_cols)}}
        out = decode_files(rows_batch, label_cols=label_cols, **decode)
        if tag:
            out[PASS] = np.full(len(out["image"]), epoch, np.int32)
        parts.append(out)
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def files_dataset(df: pd.DataFrame, space: LabelSpace, pre: Preprocess, aug: Augment | None,
                  batch_size: int = 32, *, shuffle: bool = False, seed: int | None = None,
                  targets: TargetMap | None = None, epochs: int = 1) -> ray.data.Dataset:
    """Raw image files -> batch dicts; labels through `targets` (default: U-Zeros, blank zero).
    One decode task per block of rows, sized by `_rows_per_task`, so decoding spreads over all
    CPUs; `batch_size` is the smallest block, and training re-batches.

    epochs > 1 (training): the dataset holds that many passes over the rows, one after another,
    so one execution feeds the whole run, and each row carries its pass in a PASS column
    (`PassStream` takes them an epoch at a time). Ray Data starts a pipeline in ~40 ms and fills
    it a wave of tasks later; re-executed every epoch, that start and the epoch's tail (the last
    tasks, when CPUs fall idle) came back every epoch, and short epochs ran at 0.93x a
    persistent-worker DataLoader (benchmarks/results/data.md). Now the next pass's tasks fill
    the CPUs while an epoch ends.

    shuffle (training): every pass reads the rows in its own order, a permutation of all of them
    seeded by (seed, pass), so batches differ from epoch to epoch and an uninterrupted run's data
    order is reproducible (augmentation draws are not). Without it, a manifest in folder order
    (Kermany's: every NORMAL, then every PNEUMONIA) trains on one class at a time.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    frame = df.reset_index(drop=True)
    paths = np.array([str(p).encode("utf-8") for p in frame["path"]], dtype=bytes)
    cells = frame[list(space.columns)].to_numpy(np.float32).reshape(len(frame), len(space.columns))
    if shuffle and seed is None:
        seed = int(np.random.default_rng().integers(2**31))  # drawn once: every task of a pass agrees
    rows = _rows_per_task(len(frame), batch_size, pre.size, tasks_per_cpu=1 if epochs > 1 else 2)
    n_blocks = max(1, math.ceil(len(frame) / rows))
    bounds = np.linspace(0, len(frame), n_blocks + 1).astype(int)
    # Every free CPU for the decode tasks from the first block on. Ray Data's resource reservation
    # (on by default in 2.60) keeps half of the cluster per operator for the operators downstream;
    # this pipeline has none (task ids -> one decode map), so on a 2-CPU node it ran its decode
    # tasks one at a time: NIH PNGs at 123 img/s against a 2-worker DataLoader's 196, and 172-185
    # with the reservation off (benchmarks/results/data.md, 2026-12-07). Scoring's pipeline (decode
    # tasks feeding a Predictor actor pool) is built elsewhere and keeps the reservation.
    with _context_set("op_resource_reservation_enabled", False):
        # One id per (pass, block): generated in the decode task itself (the read fuses with the
        # map), so a long run holds no copy of the paths per pass.
        tasks = ray.data.range(epochs * n_blocks, override_num_blocks=epochs * n_blocks)
    ds = tasks.map_batches(decode_pass_blocks, batch_size=None, batch_format="numpy",
                           fn_kwargs={"paths": paths, "cells": cells, "bounds": bounds,
                                      "seed": seed if shuffle else None, "tag": epochs > 1,
                                      "pre": pre, "aug": aug, "label_cols": list(space.columns),
                                      "targets": _targets(space, targets)})
    # Blocks come out in task order, so each worker sees the passes one after another (PassStream
    # relies on it) and the order is the seeded one; measured at no cost on local files
    # (benchmarks/results/data.md). Ray Train replaces a dataset's execution options with its
    # own, so train.py asks for the same (ordered_ingest). The price: Train's split stops
    # preferring a worker's own node for a block, and a slow task holds back the ones after it.
    ds.context.execution_options.preserve_order = True
    return ds


class PassStream:
    """The batches of a multi-pass dataset (rows tagged with their PASS, in pass order), taken
    one epoch at a time: epoch k is every row of passes up to k not taken yet.

    A batch that spans two passes is cut at the boundary, and its rest opens the next epoch.
    A row left over from an earlier pass (one worker may hold a few more rows of a pass than
    another, see train._in_lockstep) opens the next epoch too: nothing is lost or read twice.
    Batches come out with their PASS column, which `untagged` removes.
    """

    def __init__(self, batches: Iterable[dict]):
        self._batches, self._held = iter(batches), []

    def epoch(self, k: int) -> Iterator[dict]:
        while True:
            batch = self._held.pop() if self._held else next(self._batches, None)
            if batch is None:
                return
            cut = int(np.searchsorted(np.asarray(batch[PASS]), k, side="right"))  # tags never decrease
            if cut < len(batch[PASS]):
                self.put_back({name: v[cut:] for name, v in batch.items()})
                if cut:
                    yield {name: v[:cut] for name, v in batch.items()}
                return
            yield batch

    def put_back(self, batch: dict) -> None:
        """A batch taken but not used: it comes out first next time."""
        self._held.append(batch)


def untagged(batch: dict) -> dict:
    return {name: v for name, v in batch.items() if name != PASS}


def ordered_ingest():
    """Ray Train's ingest options for a `files_dataset`, with its order kept (see there)."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


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
    rows = _rows_per_task(int(info["images"].get(split, 0)), batch_size, pre.size)
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
