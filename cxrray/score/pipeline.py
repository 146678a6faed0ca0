"""The Ray side of bulk scoring: a Predictor actor pool streaming results into the store.

Images with no committed row yet are split into fixed chunks. Ray Data streams their paths
through `map_batches(Predictor, ActorPoolStrategy)` (decoding in the actors, or in a separate
CPU task stage); the driver routes result rows to their chunk, and the store commits each
complete chunk (see store.py). A killed Ray worker is restarted by Ray Data and its batch
retried; rows that arrive twice are dropped by image_id.
"""
from __future__ import annotations

import logging
import math
import time
import uuid
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from typing import Iterator

import pandas as pd
import pyarrow as pa

from cxrray import console, storage
from cxrray.console import Progress
from cxrray.job_configs import DEFAULT_CHUNK, ScoreConfig  # noqa: F401 - re-exported: the schema of a job
from cxrray.predict import Predictor, decode_batch
from cxrray.score.errors import OutputConflict, ScoreError
from cxrray.score.inputs import fingerprint, list_inputs
from cxrray.score.store import (FORMAT, OutputLock, PartWriter, check_output, committed_parts, output_schema,
                                read_index, read_manifest_json, refuse_foreign_output, scan_output, to_contract,
                                write_manifest_json)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resources:
    actors: int
    cpus: float
    gpus: float
    decode: str


def plan_resources(cfg: ScoreConfig, cluster_cpus: float, cluster_gpus: float, *, can_grow: bool = True) -> Resources:
    """Actor count and per-actor resources; on CPU the default fills the cluster with
    one-thread actors (decode is single-threaded, so processes scale better than threads).

    can_grow: whether nodes may join (a cluster with an autoscaler, or one we only joined).
    When not (the local Ray a `cxrray score` starts), an actor that fits on no node is an error
    and the pool is cut to what fits: Ray Data would otherwise wait for ever on resources that
    can never come."""
    gpus = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1.0 if cluster_gpus >= 1 else 0.0)
    # On GPUs, nvJPEG decodes each batch's JPEGs in the actor (its CPU path takes the rest); with
    # the Pillow decoder a CPU task stage decodes so the GPU actors only run forward passes.
    decode = cfg.decode if cfg.decode != "auto" else ("task" if gpus and cfg.decoder == "pil" else "actor")
    if cfg.actors:
        actors = cfg.actors
    elif gpus:
        actors = max(1, int(cluster_gpus // gpus))
    else:
        spare = 1 if decode == "task" else 0  # leave a CPU for the decode tasks
        actors = max(1, int((cluster_cpus - spare) // cfg.cpus_per_actor))
    one_fits = cfg.cpus_per_actor <= cluster_cpus and gpus <= cluster_gpus
    if not can_grow and not one_fits:
        raise ScoreError(f"one actor needs {cfg.cpus_per_actor:g} CPUs and {gpus:g} GPUs; this Ray has "
                         f"{cluster_cpus:g} CPUs and {cluster_gpus:g} GPUs, and no autoscaler to add more: lower "
                         "--cpus-per-actor / --gpus-per-actor, or join a bigger cluster (--ray-address)")
    fit = int(min(cluster_cpus // cfg.cpus_per_actor, cluster_gpus // gpus if gpus else math.inf))
    if actors > fit and not can_grow:
        log.info("%d actors do not fit in this Ray (%g CPUs, %g GPUs): %d instead", actors, cluster_cpus,
                 cluster_gpus, fit)
        actors = fit
    elif actors * cfg.cpus_per_actor > cluster_cpus or actors * gpus > cluster_gpus:
        log.warning("%d actors x (%g CPUs, %g GPUs) exceed the cluster's %g CPUs and %g GPUs: actors will wait "
                    "for an autoscaler", actors, cfg.cpus_per_actor, gpus, cluster_cpus, cluster_gpus)
    return Resources(actors, cfg.cpus_per_actor, gpus, decode)


def _cluster_can_grow() -> bool:
    """False for the Ray this process started itself (a head node with no autoscaler); a joined
    cluster may have one (KubeRay, `ray up`), and its jobs wait for the nodes it adds."""
    try:
        import ray

        return not ray._private.worker._global_node.head  # private: a driver that joined has head=False
    except Exception:  # noqa: BLE001 - another Ray's internals: assume the cluster can grow, as before
        return True


class ContractPredictor(Predictor):
    """Predictor returning Arrow: Ray Data cannot convert the ragged `positive` lists from
    numpy (it would pickle them), and the cast then runs in the actors, not on the driver."""

    def __call__(self, batch: dict) -> pa.Table:
        rows = super().__call__(batch)
        schema = output_schema(self.prob_columns)
        cols = {f.name: pa.array(list(rows[f.name]) if pa.types.is_list(f.type) else rows[f.name], type=f.type,
                                 from_pandas=True) for f in schema}
        return to_contract(pa.table(cols), schema)


def build_dataset(todo: pd.DataFrame, cfg: ScoreConfig, res: Resources, preprocess):
    import ray
    from ray.data import ActorPoolStrategy

    # Blocks of a few batches: enough tasks to keep every actor busy, few enough to be cheap.
    rows = max(cfg.batch_size, min(cfg.batch_size * 4, math.ceil(len(todo) / max(1, 4 * res.actors))))
    ds = ray.data.from_pandas([todo.iloc[i : i + rows] for i in range(0, len(todo), rows)])
    if res.decode == "task":
        # Decoding stays a stage of its own: with equal remote args Ray Data would fuse it into the
        # actors, which is just decode="actor" with extra copies. max_calls=0 (no limit) is Ray's
        # default for CPU tasks, said out loud so the two stages' args differ (ray_remote_args_fn
        # did this before; it is deprecated and goes in Ray 2.64, as are unnamed remote args).
        ds = ds.map_batches(decode_batch, batch_size=cfg.batch_size, num_cpus=1, max_calls=0,
                            fn_kwargs={"pre": preprocess, "max_pixels": cfg.max_pixels, "max_bytes": cfg.max_bytes,
                                       "strict": cfg.strict})
    extra = {"num_gpus": res.gpus} if res.gpus else {}
    return ds.map_batches(
        ContractPredictor,
        fn_constructor_kwargs={"artifact": storage.normalize(cfg.artifact), "device": "cuda" if res.gpus else "cpu",
                               "num_threads": max(1, int(res.cpus)), "max_pixels": cfg.max_pixels,
                               "max_bytes": cfg.max_bytes, "strict": cfg.strict, "decoder": cfg.decoder},
        batch_size=cfg.batch_size,
        compute=ActorPoolStrategy(size=res.actors),
        num_cpus=res.cpus,
        **extra,
    )


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
    res = plan_resources(cfg, cluster.get("CPU", 1), cluster.get("GPU", 0), can_grow=_cluster_can_grow())
    # No more actors than batches: an actor with nothing to do still costs a process, a torch
    # import and a model load (seconds each on a small machine, e.g. evaluating a small split).
    res = replace(res, actors=min(res.actors, math.ceil(len(todo) / cfg.batch_size)))
    log.info("%d actors x (%g CPU, %g GPU), decode in %ss, batch %d, chunks of %d",
             res.actors, res.cpus, res.gpus, res.decode, cfg.batch_size, cfg.chunk_size)
    log.info("scoring %d images (%d already in the output)", len(todo), done_before)
    # A bar on a terminal; a log line every 15 s otherwise (job logs, files).
    progress = Progress("scoring", len(todo), unit="img", every_s=15, logger=log)
    t0, first_result = time.perf_counter(), 0.0
    try:
        for batch in _stream(build_dataset(todo, cfg, res, preprocess)):
            first_result = first_result or time.perf_counter() - t0
            progress.update(writer.add(batch))
    finally:
        writer.flush()  # on failure (or SIGTERM) keep the rows already scored
        progress.close()
    return res, first_result


def _problem_rows(rows: pd.DataFrame, schema: pa.Schema, model_id: str) -> pa.Table:
    """Error rows for files the listing could not hand to a decoder (inputs.list_inputs' `problem`)."""
    n = len(rows)
    reasons = [problem.partition(": ") for problem in rows["problem"]]  # "reason: detail"
    cols = {"image_id": rows["image_id"].tolist(), "path": rows["path"].tolist(),
            "error": [f"{reason}: {path}: {detail}" for (reason, _, detail), path in zip(reasons, rows["path"])],
            "model_id": [model_id] * n, "positive": [[] for _ in range(n)]}
    arrays = {f.name: pa.array(cols[f.name], f.type) if f.name in cols else pa.nulls(n, f.type) for f in schema
              if f.name in cols or f.name.startswith("p_")}
    return pa.table(arrays)


def summarize(out: str, inputs: pd.DataFrame, model_id: str, writer: PartWriter, done_before: int,
              wall: float) -> dict:
    """The job summary, from the committed output as it now is (checked id for id against the input)."""
    index = read_index(out)
    check = check_output(index, inputs)
    reasons = Counter(error_reason(e) for e in index["error"].dropna())
    return {
        "output": out, "model_id": model_id, "images": len(inputs), "rows": len(index),
        "scored_this_run": writer.rows_written, "already_done": done_before,
        "errors": int(sum(reasons.values())), "errors_by_reason": dict(sorted(reasons.items())),
        "wall_s": round(wall, 3), "images_per_s": round(writer.rows_written / wall, 2) if wall > 0 else 0.0,
        "parts": len(committed_parts(out)), "retried_rows_dropped": writer.duplicates,
        "complete": not any(check.values()), **check,
    }


def error_reason(error: str) -> str:
    return error.split(":", 1)[0].strip()


def preflight(cfg: ScoreConfig) -> None:
    """Everything that can fail before work starts: stores, buckets, credentials, the artifact."""
    storage.check_store(cfg.out, what="--out")
    storage.check_target(cfg.out, folder=True, what="--out")
    storage.check_store(cfg.input, what="--input")
    storage.check_store(cfg.artifact, what="--artifact")


@contextmanager
def ray_for_job(address: str | None = None) -> Iterator[bool]:
    """The Ray a scoring job runs on, for callers that may or may not have one: the cluster
    already initialised (the demo, a test session), else the one at `address` or RAY_ADDRESS
    (a `ray job submit` driver), else a local one started here and shut down on exit, as
    `cxrray score` does. Yields whether this call started it."""
    import ray.data

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, configure_logging=False)
        console.after_ray_init()
    ray.data.DataContext.get_current().enable_progress_bars = False  # Progress counts images, not blocks
    try:
        yield started
    finally:
        if started:
            ray.shutdown()


def score(cfg: ScoreConfig) -> dict:
    """Run (or finish) one scoring job; returns the summary. Runs on the Ray already
    initialised, else joins or starts one while there are images to score (`ray_for_job`)."""
    from cxrray.artifact import read_meta

    t0 = time.perf_counter()
    preflight(cfg)
    meta = read_meta(cfg.artifact)
    schema = output_schema(meta.label_space.prob_columns)
    out = storage.normalize(cfg.out)
    inputs = list_inputs(cfg.input, exclude=out)
    fp = fingerprint(inputs)
    # Refuse a folder that is not ours before the lock creates it or a _lock file in it.
    refuse_foreign_output(out)
    lock = OutputLock(out)
    try:
        state = scan_output(out, meta.model_id, schema, force_model=cfg.force_model)
        stale = state.done - set(inputs["image_id"])
        if stale:
            raise OutputConflict(f"{out} has rows for {len(stale)} images not in this input (e.g. "
                                 f"{sorted(stale)[0]!r}): the input changed; score into a new --out")
        todo = inputs[~inputs["image_id"].isin(state.done)].reset_index(drop=True)
        doc = read_manifest_json(out) or {
            "model_id": meta.model_id, "architecture": meta.architecture,
            "label_space": meta.label_space.to_dict(), "columns": schema.names, "runs": []}
        doc["format"] = FORMAT
        run_id = uuid.uuid4().hex[:12]
        run = {"run": run_id, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "artifact": storage.normalize(cfg.artifact), "input": cfg.input, "images": len(inputs),
               "input_fingerprint": fp, "chunk_size": cfg.chunk_size, "already_done": len(state.done),
               "to_score": len(todo), "config": asdict(cfg)}
        doc["runs"].append(run)
        doc["complete"] = False
        write_manifest_json(out, doc)
        writer = PartWriter(out, todo["image_id"].tolist(), cfg.chunk_size, state.next_part, schema,
                            meta.model_id, meta.label_space.to_dict(), run_id=run_id)
        unreadable = todo["problem"].notna()
        if unreadable.any():  # never sent to a decoder: their error is known from the listing
            writer.add(_problem_rows(todo[unreadable], schema, meta.model_id))
            todo = todo[~unreadable].reset_index(drop=True)
        todo = todo.drop(columns="problem")  # all None now: not carried through the pipeline
        with ray_for_job(cfg.ray_address) if len(todo) else nullcontext():  # nothing left: no cluster to start
            res, first_result = _run_pipeline(todo, cfg, meta.preprocess, writer, len(state.done))
        summary = summarize(out, inputs, meta.model_id, writer, len(state.done), time.perf_counter() - t0)
        summary.update(first_result_s=round(first_result, 3), resources=asdict(res) if res else None)
        run.update(finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), scored=writer.rows_written, wall_s=summary["wall_s"])
        doc["complete"] = summary["complete"]
        write_manifest_json(out, doc)
        return summary
    finally:
        lock.release()
