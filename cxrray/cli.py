"""`cxrray demo|synth|manifest|leakage|prepare|train|evaluate|score|register|serve`.

Every subcommand prints a human summary and, with --json, a machine-readable summary as the
last line of standard output. `main(argv)` takes a list so tests drive it end to end.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any, Callable, Sequence

from cxrray.schema import ConfigError, one_line

log = logging.getLogger("cxrray")


def _emit(args: argparse.Namespace, human: str, summary: dict[str, Any]) -> None:
    print(human, flush=True)
    if getattr(args, "json", False):
        print(json.dumps(summary, default=str), flush=True)


def _manifest_config(args: argparse.Namespace):
    from cxrray.config import MOVED_UNCERTAINTY, ManifestConfig
    from cxrray.schema import from_args

    if args.uncertainty or args.uncertainty_override or args.blank:  # flags of older releases: say where they went
        raise ConfigError(MOVED_UNCERTAINTY)
    return from_args(ManifestConfig, args)


def _train_config(args: argparse.Namespace):
    from cxrray.config import TrainConfig, load_config

    return load_config(TrainConfig, args.config, args.overrides)


def _serve_config(args: argparse.Namespace):
    from cxrray.job_configs import ServeArgs

    return ServeArgs.from_dict({k: getattr(args, k) for k in ServeArgs.__pydantic_fields__ if hasattr(args, k)})


def _from_flags(cls_name: str) -> Callable[[argparse.Namespace], Any]:
    def make(args: argparse.Namespace):
        from cxrray import job_configs
        from cxrray.schema import from_args

        return from_args(getattr(job_configs, cls_name), args)

    return make


def _check_artifact(artifact: str) -> None:
    """A missing or unreadable artifact is one line before Ray or any work starts."""
    from cxrray import storage
    from cxrray.artifact import check_local_weights

    storage.check_store(artifact, what="--artifact")
    check_local_weights(artifact)  # reads model.json too


# --- synth -------------------------------------------------------------------------------------


def cmd_synth(args: argparse.Namespace) -> int:
    from cxrray.sources.synthetic import SynthConfig, write_synthetic_chexpert

    config = SynthConfig(n_patients=args.n_patients, size=args.size, seed=args.seed)
    s = write_synthetic_chexpert(args.out, config, progress=not args.json)
    prevalence = ", ".join(f"{k} {v:.0%}" for k, v in s.prevalence.items())
    human = (f"wrote {s.n_images} synthetic chest X-rays of {s.n_patients} patients to {s.root} in "
             f"{s.seconds:.1f}s\n  prevalence: {prevalence}\n  boxes: {s.boxes_csv}")
    summary = {"root": s.root, "n_images": s.n_images, "n_patients": s.n_patients, "prevalence": s.prevalence,
               "train_csv": s.train_csv, "valid_csv": s.valid_csv, "boxes_csv": s.boxes_csv, "seconds": s.seconds}
    if args.dicom:
        from cxrray.sources.synthetic_dicom import write_synthetic_dicom

        d = write_synthetic_dicom(args.out, config, progress=not args.json)
        human += (f"\n  DICOM copy: {d.n_images} CR/DX files in {d.root} ({d.seconds:.1f}s), labels {d.labels_csv}"
                  f"\n  transfer syntaxes: {', '.join(f'{k} {v}' for k, v in d.syntaxes.items())}"
                  + (f"\n  not writable here: {', '.join(d.unavailable)}" if d.unavailable else ""))
        summary["dicom"] = {"root": d.root, "labels_csv": d.labels_csv, "n_images": d.n_images,
                            "syntaxes": d.syntaxes, "unavailable": d.unavailable, "seconds": d.seconds}
    _emit(args, human, summary)
    return 0


# --- manifest / leakage ----------------------------------------------------------------------------


def cmd_manifest(args: argparse.Namespace) -> int:
    from cxrray.manifest_build import build_manifest

    cfg = args.cfg
    m = build_manifest(cfg)
    df, space, leak = m.frame, m.label_space, m.leakage
    splits = df["split"].value_counts(dropna=False).to_dict()
    human = [f"manifest {m.path}: {len(df)} images, {df['patient_id'].nunique()} patients, "
             f"{space.num_classes} classes ({space.task}) in {m.seconds:.1f}s",
             f"  splits: {splits}",
             f"  skipped: {m.skipped.counts() or 'none'}"]
    if m.skipped_csv:
        human.append(f"  skipped rows listed in {m.skipped_csv}")
    if leak is not None:
        human.append("  leakage check: " + leak.summary())
    _emit(args, "\n".join(human), {"manifest": m.path, "n_images": len(df), "n_patients": int(df["patient_id"].nunique()),
                                   "labels": list(space.names), "splits": splits,
                                   "skipped": m.skipped.counts(), "info": m.info,
                                   "leakage": leak.to_dict() if leak else None})
    return 0


def cmd_leakage(args: argparse.Namespace) -> int:
    from cxrray.manifest import read_manifest
    from cxrray.splits import check_leakage

    df, _ = read_manifest(args.manifest)
    leak = check_leakage(df, hash_images=not args.no_hash)
    _emit(args, leak.summary(), leak.to_dict())
    return 0 if leak.ok or not args.strict else 3


# --- prepare / train / evaluate ---------------------------------------------------------------------


def _ray_init(address: str | None) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, configure_logging=False)


def cmd_prepare(args: argparse.Namespace) -> int:
    from cxrray.data import prepare_shards
    from cxrray.manifest import read_manifest

    _ray_init(args.ray_address)
    df, space = read_manifest(args.manifest)
    start = time.time()
    info = prepare_shards(df, space, args.out, size=args.size, rows_per_shard=args.rows_per_shard,
                          progress=not args.json)
    secs = time.time() - start
    _emit(args, f"prepared {sum(info.images.values())} images at {info.size} px into {args.out} "
                f"({info.shards} shards; unreadable skipped: {info.errors}) in {secs:.1f}s",
          {"out": args.out, "size": info.size, "shards": info.shards, "images": info.images, "errors": info.errors,
           "seconds": secs})
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cxrray.train import train  # after the config validated (main): torch and Ray load here

    cfg = args.cfg
    res = train(cfg)
    auroc = f"{res.best_val_mean_auroc:.4f}" if res.best_val_mean_auroc is not None else "n/a"
    _emit(args, f"trained {cfg.model} for {res.epochs_done} epochs in {res.seconds:.0f}s: best validation mean "
                f"AUROC {auroc}\n  best artifact: {res.best_artifact}\n  last artifact: {res.last_artifact}",
          {k: v for k, v in res.to_dict().items() if k != "history"})
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from cxrray import storage

    cfg = args.cfg
    storage.check_store(cfg.out, what="--out")
    storage.check_store(cfg.manifest, what="--manifest")
    for m in cfg.members:
        _check_artifact(m)
    from cxrray.artifact import read_meta
    from cxrray.ensemble import DEFAULT_TTA, build_ensemble

    out = build_ensemble(cfg.members, cfg.manifest, cfg.out, tta=DEFAULT_TTA if cfg.tta else (),
                         val_labels=cfg.val_labels, actors=cfg.actors, ray_address=cfg.ray_address)
    meta = read_meta(out)
    auroc = meta.summary.get("val_mean_auroc")
    _emit(args, f"ensemble of {meta.members} {meta.architecture} model(s){' with TTA' if meta.tta else ''}: "
                f"validation mean AUROC {auroc:.4f}\n  artifact: {out}" if auroc is not None else f"artifact: {out}",
          {"artifact": str(out), "model_id": meta.model_id, "members": meta.members, "tta": meta.tta,
           "val_mean_auroc": auroc, "thresholds": meta.thresholds})
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cxrray import storage
    from cxrray.config import save_config

    cfg = args.cfg
    storage.check_store(cfg.out, what="--out")
    storage.check_store(cfg.manifest, what="--manifest")
    _check_artifact(cfg.artifact)
    from cxrray.evaluate import evaluate

    res = evaluate(**cfg.kwargs())
    # Beside the report; the JSON summary stays metrics.json's content (the config's place is fixed).
    saved = save_config(cfg, storage.join(storage.normalize(cfg.out), "config.yaml"))
    m = res.metrics
    lines = [f"evaluated model {res.model_id} on {res.n_images} {cfg.split} images ({res.n_errors} unreadable)",
             f"  mean AUROC: {m.mean_auroc:.4f}" if m.mean_auroc is not None else "  mean AUROC: n/a"]
    if m.accuracy is not None:
        lines.append(f"  accuracy: {m.accuracy:.4f}")
    for c in m.per_class:
        ci = f" [{c.auroc_ci[0]:.3f}, {c.auroc_ci[1]:.3f}]" if c.auroc_ci else ""
        lines.append(f"  {c.name:28s} AUROC {c.auroc:.3f}{ci}" if c.auroc is not None else f"  {c.name:28s} {c.note}")
    lines.append(f"  report: {res.outputs['markdown']}  ROC curves: {res.outputs['roc_curves']}")
    gallery = [v for k, v in res.outputs.items() if k.startswith("gradcam_gallery_")]
    if gallery:
        lines.append(f"  Grad-CAM gallery: {len(gallery)} PNGs, e.g. {gallery[0]}")
    lines.append(f"  config: {saved}")
    _emit(args, "\n".join(lines), res.to_dict())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    cfg = args.cfg
    _check_artifact(cfg.artifact)
    from cxrray import serve

    limits = {k: v for k, v in asdict(cfg).items() if k not in ("artifact", "deployment")}
    url = serve.run_server(cfg.artifact, host=args.host, port=args.port, blocking=not args.json, **limits)
    _emit(args, f"serving {cfg.artifact} at {url}", {"url": url, "config": asdict(cfg)})
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from cxrray import tracking

    res = tracking.register(args.name, run_dir=args.run_dir, artifact=args.artifact, alias=args.alias,
                            tracking_uri=args.tracking_uri, experiment=args.experiment)
    serve_uri = res.get("alias_uri", res["uri"])
    _emit(args, f"registered {res['uri']} (model_id {res['model_id']}, MLflow run {res['run_id']})"
                + (f"\n  alias: {res['alias_uri']}" if "alias_uri" in res else "")
                + f"\n  serve it: MLFLOW_TRACKING_URI={res['tracking_uri']} cxrray serve --artifact {serve_uri}", res)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cxrray.demo import run_demo

    summary = run_demo(args.cfg)
    _emit(args, summary.human(), summary.to_dict())
    return 0


# --- parser ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from cxrray.config import ManifestConfig, TrainConfig
    from cxrray.job_configs import DemoConfig, EnsembleConfig, EvaluateConfig, ScoreConfig, ServeArgs
    from cxrray.schema import add_flags, keys_help

    p = argparse.ArgumentParser(prog="cxrray", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging, and Ray's own log lines (hidden by default: they are in Ray's log directory)")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable, help_: str, config: Callable | None = None, **kw) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_, **kw)
        sp.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
        # also after the subcommand (`cxrray train -v ...`); SUPPRESS keeps `cxrray -v train`'s value
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="as cxrray -v")
        # config: args -> the job's validated schema, built by main before Ray or torch is imported
        sp.set_defaults(fn=fn, make_config=config)
        return sp

    add_flags(add("demo", cmd_demo, "the whole story on synthetic chest X-rays: data, split, train, evaluate, score, "
                  "serve", _from_flags("DemoConfig")), DemoConfig)

    s = add("synth", cmd_synth, "write a synthetic chest X-ray dataset in CheXpert layout")
    s.add_argument("--out", required=True)
    s.add_argument("--n-patients", type=int, default=300)
    s.add_argument("--size", type=int, default=128)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dicom", action="store_true",
                   help="also write the images as CR/DX DICOM (every installed transfer syntax) under OUT/dicom")

    m = add("manifest", cmd_manifest, "build a manifest (and patient split) from a dataset", _manifest_config)
    add_flags(m, ManifestConfig)
    for flag in ("--uncertainty", "--uncertainty-override", "--blank"):  # moved: training applies the policy
        m.add_argument(flag, action="append", default=[], help=argparse.SUPPRESS)

    lk = add("leakage", cmd_leakage, "report patients and identical images shared across splits")
    lk.add_argument("--manifest", required=True)
    lk.add_argument("--no-hash", action="store_true")
    lk.add_argument("--strict", action="store_true", help="exit 3 when leakage is found")

    pr = add("prepare", cmd_prepare, "decode and resize once into Parquet shards of ~1k images")
    pr.add_argument("--manifest", required=True)
    pr.add_argument("--out", required=True)
    pr.add_argument("--size", type=int, default=224)
    pr.add_argument("--rows-per-shard", type=int, default=1000)
    pr.add_argument("--ray-address", default=None)

    t = add("train", cmd_train, "train with Ray Train (TorchTrainer) from a YAML config", _train_config,
            epilog=keys_help(TrainConfig, "keys (YAML `key: value` or `key=value` overrides; YAML 1.1 values)"),
            formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", default=None, help="YAML config (see jobs/configs/)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="override a key of the config (see below)")

    add_flags(add("evaluate", cmd_evaluate, "evaluate an artifact on a manifest split", _from_flags("EvaluateConfig")),
              EvaluateConfig)
    add_flags(add("ensemble", cmd_ensemble, "combine trained artifacts (seeds) into one ensemble artifact, "
                  "optionally with test-time augmentation", _from_flags("EnsembleConfig")), EnsembleConfig)

    # The same flags as `python -m cxrray.score` (both from ScoreConfig); cxrray.score itself,
    # which imports torch, loads only when the command runs.
    add_flags(add("score", cmd_score, "bulk-score an image archive (folder, glob, CSV/Parquet, s3://) to Parquet",
                  _from_flags("ScoreConfig")), ScoreConfig)

    rg = add("register", cmd_register, "register a run's best artifact as an MLflow model version")
    which = rg.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-dir", help="a training run's dir (its MLflow run, from tracking.json)")
    which.add_argument("--artifact", help="any artifact dir or URI (logged into a new MLflow run first)")
    rg.add_argument("--name", required=True, help="registered model name, e.g. cxrray-chexpert")
    rg.add_argument("--alias", default=None, help="point this alias at the version, e.g. production")
    rg.add_argument("--tracking-uri", default=None,
                    help="MLflow store (default: the run's own; for --artifact, $MLFLOW_TRACKING_URI)")
    rg.add_argument("--experiment", default="cxrray", help="--artifact: the experiment of the new run")

    sv = add("serve", cmd_serve, "serve an artifact over HTTP with Grad-CAM (Ray Serve)", _serve_config)
    add_flags(sv, ServeArgs, required=("artifact",))
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    sv.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    return p


def cmd_score(args: argparse.Namespace) -> int:
    from cxrray.score import run

    return run(args)


RAY_COMMANDS = frozenset({"demo", "prepare", "train", "score", "serve", "evaluate", "ensemble"})


def _config_error(args: argparse.Namespace, message: str) -> int:
    print(f"cxrray: error: {message}", file=sys.stderr, flush=True)
    if getattr(args, "json", False):
        print(json.dumps({"error": message}), flush=True)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    from pydantic import ValidationError

    args = build_parser().parse_args(argv)
    # The job's config first: a wrong key or value is one line (exit 2) before Ray, torch or
    # any work starts.
    try:
        if args.make_config is not None:
            args.cfg = args.make_config(args)
    except (ConfigError, FileNotFoundError) as e:  # a --config that is not there, too
        return _config_error(args, str(e))
    except ValidationError as e:
        return _config_error(args, one_line(e))

    from cxrray import console
    from cxrray.native_stderr import filtered_native_stderr
    from cxrray.storage import StorageError

    # cxrray's lines by default; Ray's own (its INFO lines, its actors' output) with -v.
    console.setup_console(args.verbose, uses_ray=args.command in RAY_COMMANDS)
    # Ray's C++ driver writes one known note per actor pool straight to fd 2 (native_stderr.py).
    quiet_native = filtered_native_stderr(enabled=args.command in RAY_COMMANDS and not args.verbose)
    try:
        with quiet_native:
            rc = args.fn(args)
        if args.command in RAY_COMMANDS and args.command != "demo" and console.ray_log_dir():
            log.info("Ray's own logs: %s%s", console.ray_log_dir(), "" if args.verbose else "  (-v prints them here)")
        return rc
    except ConfigError as e:
        return _config_error(args, str(e))
    except ValidationError as e:
        return _config_error(args, one_line(e))
    except KeyboardInterrupt:
        log.error("interrupted")  # Ctrl-C is the user's choice: a line, not a traceback
        return 130
    except (ValueError, FileNotFoundError, StorageError) as e:
        # User errors (bad CSV, missing column, wrong path) get one clear line, not a traceback.
        log.error("%s", e)
        if getattr(args, "json", False):
            print(json.dumps({"error": str(e)}))
        return 2


if __name__ == "__main__":
    sys.exit(main())
