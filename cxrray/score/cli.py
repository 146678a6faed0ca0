"""`cxrray score` / `python -m cxrray.score` / `jobs/score.py`: options -> ScoreConfig -> run.

Exit codes: 0 complete, 1 incomplete (re-run the same command), 2 refused before any work.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from cxrray.artifact import ArtifactError, read_meta
from cxrray.imaging import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from cxrray.score.errors import ScoreError
from cxrray.score.pipeline import DEFAULT_CHUNK, ScoreConfig, preflight, score
from cxrray.storage import StorageError

log = logging.getLogger("cxrray.score")

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
    p.add_argument("--strict", action="store_true",
                   help="DICOMs that are not chest radiographs (modality not CR/DX, body part not chest) become "
                        "error rows instead of scored rows with a warning")
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
    return ScoreConfig(artifact=args.artifact, input=args.input, out=args.out, batch_size=args.batch_size,
                       chunk_size=args.chunk_size, actors=args.actors, cpus_per_actor=args.cpus_per_actor,
                       gpus_per_actor=args.gpus_per_actor, decode=args.decode, force_model=args.force_model,
                       strict=args.strict, max_pixels=args.max_pixels, max_bytes=args.max_bytes,
                       ray_address=args.ray_address)


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
    try:
        preflight(cfg)  # a missing bucket or artifact is one line before any Ray process starts
        read_meta(cfg.artifact)
    except (ScoreError, StorageError, ArtifactError) as e:
        return _refused(args, e)
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=cfg.ray_address, include_dashboard=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own progress line counts images, not blocks
    old = signal.signal(signal.SIGTERM, _sigterm) if _main_thread() else None
    try:
        summary = score(cfg)
    except (ScoreError, StorageError, ArtifactError) as e:
        return _refused(args, e)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
        if started:
            ray.shutdown()  # before the JSON line: no worker log lines after it
    _log_summary(summary)
    if args.json:
        print(json.dumps(summary), flush=True)
    return 0 if summary["complete"] else 1


def _refused(args: argparse.Namespace, e: Exception) -> int:
    log.error("%s", e)
    if args.json:
        print(json.dumps({"error": str(e)}), flush=True)
    return 2


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
