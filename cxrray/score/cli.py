"""`cxrray score` / `python -m cxrray.score` / `jobs/score.py`: options -> ScoreConfig -> run.

Exit codes: 0 complete, 1 incomplete (re-run the same command), 2 refused before any work.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from cxrray.job_configs import ScoreConfig
from cxrray.schema import ConfigError, add_flags, from_args, save_config

log = logging.getLogger("cxrray.score")
CONFIG_NAME = "_config.yaml"  # beside the parts; `_` names are not output (store.list_output skips them)


def add_arguments(p: argparse.ArgumentParser, *, json_flag: bool = True) -> argparse.ArgumentParser:
    """The score options, generated from ScoreConfig, for this module's parser or a `cxrray
    score` subparser (which may already have --json: pass json_flag=False)."""
    add_flags(p, ScoreConfig)
    if json_flag:
        p.add_argument("--json", action="store_true", help="print the summary as JSON on the last stdout line")
    return p


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(
        prog="cxrray score",
        description="Score an image archive into predictions Parquet (resumable: re-run the same command after a crash)."))


def config_from_args(args: argparse.Namespace) -> ScoreConfig:
    return from_args(ScoreConfig, args)


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
    from cxrray import storage
    from cxrray.artifact import ArtifactError, check_local_weights
    from cxrray.score.errors import ScoreError
    from cxrray.score.pipeline import preflight, score
    from cxrray.storage import StorageError

    try:
        cfg = config_from_args(args)
        preflight(cfg)  # a missing bucket or artifact is one line before any Ray process starts
        check_local_weights(cfg.artifact)  # reads model.json too
    except (ConfigError, ScoreError, StorageError, ArtifactError) as e:
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
    except KeyboardInterrupt:  # Ctrl-C: a line, not a traceback; nothing committed is lost
        log.error("interrupted: %s keeps every part committed so far; the same command resumes", cfg.out)
        return 130
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
        if started:
            ray.shutdown()  # before the JSON line: no worker log lines after it
    save_config(cfg, storage.join(storage.normalize(cfg.out), CONFIG_NAME))  # how these rows were made
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
