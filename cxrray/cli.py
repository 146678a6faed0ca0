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

log = logging.getLogger("cxrray")


def _emit(args: argparse.Namespace, human: str, summary: dict[str, Any]) -> None:
    print(human, flush=True)
    if getattr(args, "json", False):
        print(json.dumps(summary, default=str), flush=True)


def _split_fracs(text: str) -> tuple[float, float, float]:
    parts = [float(x) for x in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("--split needs three fractions: train,valid,test (e.g. 0.8,0.1,0.1)")
    return tuple(parts)  # type: ignore[return-value]


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


def _source_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if args.source in ("chexpert", "synthetic"):
        from cxrray.labels import UncertaintyConfig

        overrides = dict(o.split("=", 1) for o in args.uncertainty_override)
        opts["uncertainty"] = UncertaintyConfig(args.uncertainty, overrides, args.blank)
        if args.labels:
            opts["labels"] = args.labels
        if args.views:
            opts["views"] = args.views.split(",")
        if args.no_official_split:
            opts["official_split"] = False
    if args.source == "kermany":
        opts["classes"] = args.classes
    if args.source == "csv":
        opts.update(path_col=args.path_col, label_cols=args.label_cols.split(",") if args.label_cols else None,
                    class_col=args.class_col, patient_col=args.patient_col, split_col=args.split_col)
    if args.source == "dicom":
        opts.update(labels_csv=args.labels_csv, join_on=args.join_on, salt=args.salt,
                    label_cols=args.label_cols.split(",") if args.label_cols else None)
    if args.no_check_files and args.source in ("chexpert", "synthetic", "nih", "csv"):
        opts["check_files"] = False
    return opts


def skipped_path(manifest: str) -> str:
    """manifest.parquet -> manifest.skipped.csv beside it (local or URI)."""
    base, sep, query = manifest.partition("?")
    return (base[: -len(".parquet")] if base.endswith(".parquet") else base) + ".skipped.csv" + sep + query


def cmd_manifest(args: argparse.Namespace) -> int:
    from cxrray import storage
    from cxrray.manifest import write_manifest
    from cxrray.sources import load_source
    from cxrray.splits import assign_splits, check_leakage

    start = time.time()
    storage.check_store(args.out, what="--out")
    storage.check_store(args.root, what="--root")
    res = load_source(args.source, args.root, **_source_options(args))
    df = res.manifest
    if args.split:
        has_official = df["split"].notna().any()
        df = assign_splits(df, res.label_space, args.split, seed=args.seed, respect_existing=has_official)
    leak = None
    if df["split"].notna().any() and not args.no_leakage_check:
        leak = check_leakage(df, hash_images=not args.no_hash)
    out = write_manifest(df, res.label_space, args.out, info={"source": args.source, "root": str(args.root),
                                                                "skipped": res.skipped.counts()})
    skipped_csv = skipped_path(out)
    if len(res.skipped):
        storage.write_text(skipped_csv, res.skipped.frame().to_csv(index=False))
    splits = df["split"].value_counts(dropna=False).to_dict()
    human = [f"manifest {out}: {len(df)} images, {df['patient_id'].nunique()} patients, "
             f"{res.label_space.num_classes} classes ({res.label_space.task}) in {time.time() - start:.1f}s",
             f"  splits: {splits}",
             f"  skipped: {res.skipped.counts() or 'none'}"]
    if len(res.skipped):
        human.append(f"  skipped rows listed in {skipped_csv}")
    if leak is not None:
        human.append("  leakage check: " + leak.summary())
    _emit(args, "\n".join(human), {"manifest": out, "n_images": len(df), "n_patients": int(df["patient_id"].nunique()),
                                   "labels": list(res.label_space.names), "splits": splits,
                                   "skipped": res.skipped.counts(), "info": res.info,
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
    from cxrray.config import TrainConfig, load_config
    from cxrray.train import train

    cfg = load_config(TrainConfig, args.config, args.overrides)
    res = train(cfg)
    auroc = f"{res.best_val_mean_auroc:.4f}" if res.best_val_mean_auroc is not None else "n/a"
    _emit(args, f"trained {cfg.model} for {res.epochs_done} epochs in {res.seconds:.0f}s: best validation mean "
                f"AUROC {auroc}\n  best artifact: {res.best_artifact}\n  last artifact: {res.last_artifact}",
          {k: v for k, v in res.to_dict().items() if k != "history"})
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cxrray.evaluate import evaluate

    res = evaluate(args.artifact, args.manifest, args.out, split=args.split, bootstrap=args.bootstrap,
                   gallery_k=args.gallery_k)
    m = res.metrics
    lines = [f"evaluated model {res.model_id} on {res.n_images} {args.split} images ({res.n_errors} unreadable)",
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
    _emit(args, "\n".join(lines), res.to_dict())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from cxrray import serve

    url = serve.run_server(args.artifact, host=args.host, port=args.port, blocking=not args.json)
    _emit(args, f"serving {args.artifact} at {url}", {"url": url})
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
    from cxrray.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=args.out, n_patients=args.n_patients, size=args.size, epochs=args.epochs,
                     keep_serving=args.serve, port=args.port, source=args.source, root=args.root,
                     model=args.model, num_workers=args.workers)
    summary = run_demo(cfg)
    _emit(args, summary.human(), summary.to_dict())
    return 0


# --- parser ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cxrray", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging, and Ray's own log lines (hidden by default: they are in Ray's log directory)")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
        # also after the subcommand (`cxrray train -v ...`); SUPPRESS keeps `cxrray -v train`'s value
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="as cxrray -v")
        sp.set_defaults(fn=fn)
        return sp

    d = add("demo", cmd_demo, "the whole story on synthetic chest X-rays: data, split, train, evaluate, score, serve")
    d.add_argument("--out", default="demo_out")
    d.add_argument("--n-patients", type=int, default=500)
    d.add_argument("--size", type=int, default=96, help="image size (px) for generation and the model")
    d.add_argument("--epochs", type=int, default=8)
    d.add_argument("--workers", type=int, default=2, help="TorchTrainer workers")
    d.add_argument("--model", default="small_cnn")
    d.add_argument("--serve", action="store_true", help="keep Serve running at the end and print the page URL")
    d.add_argument("--port", type=int, default=8000)
    d.add_argument("--source", default="synthetic", help="a real source instead: chexpert, nih, kermany")
    d.add_argument("--root", default=None, help="dataset root for --source")

    s = add("synth", cmd_synth, "write a synthetic chest X-ray dataset in CheXpert layout")
    s.add_argument("--out", required=True)
    s.add_argument("--n-patients", type=int, default=300)
    s.add_argument("--size", type=int, default=128)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dicom", action="store_true",
                   help="also write the images as CR/DX DICOM (every installed transfer syntax) under OUT/dicom")

    m = add("manifest", cmd_manifest, "build a manifest (and patient split) from a dataset")
    m.add_argument("--source", required=True, help="chexpert, synthetic, nih, kermany, csv, folder, dicom")
    m.add_argument("--root", required=True, help="dataset root (for csv: the CSV file)")
    m.add_argument("--out", required=True, help="manifest .parquet to write")
    m.add_argument("--split", type=_split_fracs, default=None, help="train,valid,test fractions, by patient")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--labels", default=None, help="class subset or a named selection (chexpert5)")
    m.add_argument("--uncertainty", default="U-Zeros", help="U-Ignore, U-Zeros, U-Ones or U-MultiClass")
    m.add_argument("--uncertainty-override", action="append", default=[], metavar="LABEL=POLICY",
                   help="per-label policy, e.g. Edema=U-Ones (repeatable)")
    m.add_argument("--blank", default="zero", help="blank cells: zero or ignore")
    m.add_argument("--views", default=None, help="frontal, lateral or both (CheXpert)")
    m.add_argument("--no-official-split", action="store_true", help="ignore the source's own train/valid split")
    m.add_argument("--classes", type=int, default=2, help="Kermany: 2 or 3 classes")
    m.add_argument("--path-col", default="path")
    m.add_argument("--label-cols", default=None, help="csv, dicom: comma-separated label columns")
    m.add_argument("--labels-csv", default=None, help="dicom: CSV of labels joined on --join-on")
    m.add_argument("--join-on", default="SOPInstanceUID", choices=("SOPInstanceUID", "AccessionNumber"),
                   help="dicom: the labels CSV's key (AccessionNumber: one row per study)")
    m.add_argument("--salt", default=None,
                   help="dicom: salt for hashing PatientID (prefer $CXRRAY_PATIENT_SALT: argv is visible in ps)")
    m.add_argument("--class-col", default=None, help="csv: one column of class names (multi-class)")
    m.add_argument("--patient-col", default=None)
    m.add_argument("--split-col", default=None)
    m.add_argument("--no-check-files", action="store_true", help="don't check that image files exist")
    m.add_argument("--no-leakage-check", action="store_true")
    m.add_argument("--no-hash", action="store_true", help="leakage check without content hashes")

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

    t = add("train", cmd_train, "train with Ray Train (TorchTrainer) from a YAML config")
    t.add_argument("--config", default=None, help="YAML config (see jobs/configs/)")
    t.add_argument("overrides", nargs="*", metavar="key=value")

    e = add("evaluate", cmd_evaluate, "evaluate an artifact on a manifest split")
    e.add_argument("--artifact", required=True)
    e.add_argument("--manifest", required=True)
    e.add_argument("--split", default="test")
    e.add_argument("--out", required=True)
    e.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for AUROC CIs (0: none)")
    e.add_argument("--gallery-k", type=int, default=4,
                   help="Grad-CAM gallery: top-k true and false positives per class (0: no gallery)")

    from cxrray import score as score_mod  # light at import: its Ray/torch work is lazy

    sc = add("score", score_mod.run, "bulk-score an image archive (folder, glob, CSV/Parquet, s3://) to Parquet")
    score_mod.add_arguments(sc, json_flag=False)

    rg = add("register", cmd_register, "register a run's best artifact as an MLflow model version")
    which = rg.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-dir", help="a training run's dir (its MLflow run, from tracking.json)")
    which.add_argument("--artifact", help="any artifact dir or URI (logged into a new MLflow run first)")
    rg.add_argument("--name", required=True, help="registered model name, e.g. cxrray-chexpert")
    rg.add_argument("--alias", default=None, help="point this alias at the version, e.g. production")
    rg.add_argument("--tracking-uri", default=None,
                    help="MLflow store (default: the run's own; for --artifact, $MLFLOW_TRACKING_URI)")
    rg.add_argument("--experiment", default="cxrray", help="--artifact: the experiment of the new run")

    sv = add("serve", cmd_serve, "serve an artifact over HTTP with Grad-CAM (Ray Serve)")
    sv.add_argument("--artifact", required=True)
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    sv.add_argument("--port", type=int, default=8000)
    return p


RAY_COMMANDS = frozenset({"demo", "prepare", "train", "score", "serve"})


def main(argv: Sequence[str] | None = None) -> int:
    from cxrray.storage import StorageError

    from cxrray import console

    args = build_parser().parse_args(argv)
    # cxrray's lines by default; Ray's own (its INFO lines, its actors' output) with -v.
    console.setup_console(args.verbose, uses_ray=args.command in RAY_COMMANDS)
    try:
        rc = args.fn(args)
        if args.command in RAY_COMMANDS and args.command != "demo" and console.ray_log_dir():
            log.info("Ray's own logs: %s%s", console.ray_log_dir(), "" if args.verbose else "  (-v prints them here)")
        return rc
    except (ValueError, FileNotFoundError, StorageError) as e:
        # User errors (bad CSV, missing column, wrong path) get one clear line, not a traceback.
        log.error("%s", e)
        if getattr(args, "json", False):
            print(json.dumps({"error": str(e)}))
        return 2


if __name__ == "__main__":
    sys.exit(main())
