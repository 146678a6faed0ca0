"""Kermany quality check (not a test): train from scratch through the product CLI, evaluate on test.

Runs, as subprocesses and exactly as a user would (each command is logged and saved):

  1. cxrray manifest --source kermany --classes N --split 0.9,0.1,0.0   (official test kept,
     valid carved out of train by patient)
  2. cxrray prepare  (optional, --shards-size): Parquet shards, decoded and resized once
  3. cxrray train --config jobs/configs/kermanyN.yaml [key=value ...]
  4. cxrray evaluate --split test, on the manifest's test split and on the official 624-image
     test set alone (see below)

then summarises test accuracy, AUROC, and sensitivity/specificity, both at the operating point
chosen on validation (stored in the artifact) and at argmax, into a JSON. Results and the
comparison with the published numbers: benchmarks/results/kermany.md.

Why two test sets: the name-derived patient ids (`personN`, `IM-NNNN`) of 264 official-test
patients also occur in the official train folder. To keep every patient whole, the manifest
moves those 551 train images into `test`, so its test split holds 1,175 images. Published
numbers are on the official 624, so that is the headline; the moved images are never trained on.

A private Ray head is started for the run (`ray start --head --block` on --port, stopped at
the end by terminating that process) and passed explicitly, so nothing joins another cluster.

    python benchmarks/kermany_quality.py --classes 2 --work /tmp/kq2 --shards-size 128 -- \\
        image_size=64 epochs=10 num_workers=1 cpus_per_worker=2
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CLI = [str(Path(sys.executable).with_name("cxrray"))]
log = logging.getLogger("kermany_quality")


def sh(cmd: list[str], log_file: Path, env: dict) -> dict | None:
    """Run a CLI command, tee its output to log_file, return its --json summary (last line)."""
    log.info("$ %s", shlex.join(cmd))
    t0 = time.time()
    with open(log_file, "a") as f:
        f.write(f"\n$ {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=f, text=True)
        f.write(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {shlex.join(cmd)}; see {log_file}")
    log.info("  done in %.0fs", time.time() - t0)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    return json.loads(last) if last.startswith("{") else None


class RayHead:
    """A private head node: started blocking in the background, stopped by SIGTERM to it alone."""

    def __init__(self, port: int, cpus: int, temp_dir: str, env: dict):
        ray_bin = str(Path(sys.executable).with_name("ray"))
        cmd = [ray_bin, "start", "--head", "--block", f"--port={port}", f"--num-cpus={cpus}", "--num-gpus=0",
               "--include-dashboard=false", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
        self.address = f"127.0.0.1:{port}"
        # Workers inherit the raylet's environment. Some Ray internals (Train V2's
        # PlacementGroupCleaner) find "their" cluster by auto-detection, which fails when other
        # Ray clusters run on the same machine; RAY_ADDRESS makes the answer explicit.
        env = {**env, "RAY_ADDRESS": self.address}
        log.info("$ RAY_ADDRESS=%s %s", self.address, shlex.join(cmd))
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # `ray start --block` tears down its own processes
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def official_test_manifest(manifest: Path, out: Path) -> dict:
    """A copy of the manifest whose `test` split is the official test folder only."""
    from cxrray.manifest import read_manifest, write_manifest

    df, space = read_manifest(manifest)
    moved = (df["split"] == "test") & (df["source_split"] != "test")
    counts = {"manifest_test": int((df["split"] == "test").sum()), "official_test": int((df["source_split"] == "test").sum()),
              "moved_train_to_test": int(moved.sum()),
              "official_test_in_test": int(((df["source_split"] == "test") & (df["split"] == "test")).sum()),
              "train": int((df["split"] == "train").sum()), "valid": int((df["split"] == "valid").sum()),
              "patients_moved": int(df.loc[moved, "patient_id"].nunique())}
    df = df.copy()
    df.loc[moved, "split"] = None  # out of every split (manifests allow only train/valid/test)
    write_manifest(df, space, out, info={"derived_from": str(manifest), "note": "test = official test folder only"})
    return counts


def argmax_summary(artifact: Path, manifest: Path, split: str) -> dict:
    """Accuracy and confusion at argmax (compute_metrics), plus per-class sensitivity/specificity
    at argmax, from the same Predictor the evaluation uses."""
    import torch

    from cxrray.heads import eval_targets
    from cxrray.manifest import read_manifest
    from cxrray.metrics import compute_metrics
    from cxrray.predict import Predictor, predict_paths

    pred = Predictor(artifact)
    df, _ = read_manifest(manifest)
    rows = df[df["split"] == split]
    space = pred.label_space
    out = predict_paths(pred, rows["path"].tolist(), batch_size=64)
    probs = np.stack([out[c] for c in space.prob_columns], axis=1)
    targets = eval_targets(torch.from_numpy(rows[list(space.columns)].to_numpy(np.float32)), space).numpy()
    m = compute_metrics(space, targets, probs)
    cm = np.asarray(m.confusion)
    per = {}
    for k, name in enumerate(space.names):
        tp = cm[k, k]
        fn = cm[k].sum() - tp
        fp = cm[:, k].sum() - tp
        tn = cm.sum() - tp - fn - fp
        per[name] = {"sensitivity": tp / max(tp + fn, 1), "specificity": tn / max(tn + fp, 1)}
    res = {"n": int(len(rows)), "accuracy": m.accuracy, "confusion": m.confusion, "argmax": per,
           "auroc": m.auroc_by_class(), "mean_auroc": m.mean_auroc}
    if space.names == ("NORMAL", "BACTERIAL", "VIRAL"):
        # The paper's second task: bacterial vs viral among pneumonia images.
        from sklearn.metrics import roc_auc_score

        pn = targets[:, 0] == 0
        yv = targets[pn, 2]
        pv = probs[pn, 2] / (probs[pn, 1] + probs[pn, 2])
        res["bacterial_vs_viral"] = {"n": int(pn.sum()), "accuracy": float(np.mean((pv >= 0.5) == (yv == 1))),
                                     "auroc": float(roc_auc_score(yv, pv))}
    return res


def train_run(args: argparse.Namespace, work: Path, manifest: Path, config: str, run_name: str, env: dict,
              logf: Path, summary: dict) -> None:
    """Optional shards, then `cxrray train`, on a private Ray head stopped afterwards."""
    head = RayHead(args.ray_port, args.ray_cpus, f"/tmp/ray_kq_{args.ray_port}", env)
    try:
        time.sleep(5)
        extra = []
        if args.shards_size:
            shards = work / f"shards{args.shards_size}"
            if not (shards / "shards.json").exists():
                cmd = CLI + ["prepare", "--manifest", str(manifest), "--out", str(shards), "--size",
                             str(args.shards_size), "--ray-address", head.address, "--json"]
                summary["commands"].append(shlex.join(cmd))
                t0 = time.time()
                sh(cmd, logf, env)
                summary["prepare_s"] = time.time() - t0
            extra = ["data_format=shards", f"shards_dir={shards}"]
        cmd = CLI + ["train", "--config", config, f"manifest={manifest}", f"storage_path={work / 'runs'}",
                     f"run_name={run_name}", f"ray_address={head.address}", *extra, *args.overrides, "--json"]
        summary["commands"].append(shlex.join(cmd))
        t0 = time.time()
        summary["train"] = sh(cmd, logf, env)
        summary["train_wall_s"] = time.time() - t0
    finally:
        head.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, choices=(2, 3), default=2)
    p.add_argument("--config", default=None, help="default: jobs/configs/kermany{classes}.yaml")
    p.add_argument("--root", default="../shared/data/kermany")
    p.add_argument("--work", required=True, help="outputs (manifest, shards, runs, evaluations)")
    p.add_argument("--shards-size", type=int, default=0, help="prepare shards at this size and train from them")
    p.add_argument("--ray-port", type=int, default=6391)
    p.add_argument("--ray-cpus", type=int, default=4, help="> train workers' CPUs, so Ray Data can decode")
    p.add_argument("--run-name", default=None)
    p.add_argument("--artifact", choices=("best", "last"), default="best",
                   help="best: the epoch with the highest validation AUROC (default); last: the final epoch")
    p.add_argument("--eval-only", action="store_true", help="evaluate the existing run --run-name (no training)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="train config overrides")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    config = args.config or f"jobs/configs/kermany{args.classes}.yaml"
    run_name = args.run_name or f"kermany{args.classes}-{time.strftime('%H%M%S')}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    logf = work / f"{run_name}.log"
    summary: dict = {"config": config, "overrides": args.overrides, "run_name": run_name, "commands": []}

    manifest = work / "manifest.parquet"
    if not manifest.exists():
        cmd = CLI + ["manifest", "--source", "kermany", "--root", args.root, "--classes", str(args.classes),
                     "--split", "0.9,0.1,0.0", "--out", str(manifest), "--json"]
        summary["commands"].append(shlex.join(cmd))
        summary["manifest"] = sh(cmd, logf, env)
    official = work / "manifest_official_test.parquet"
    summary["split_check"] = official_test_manifest(manifest, official)
    log.info("split check: %s", summary["split_check"])

    if args.eval_only:
        log.info("--eval-only: evaluating %s", work / "runs" / run_name)
    else:
        train_run(args, work, manifest, config, run_name, env, logf, summary)

    best = work / "runs" / run_name / "artifacts" / args.artifact
    summary["artifact"] = str(best)
    summary["evaluate"] = {}
    for name, mf in (("official_test", official), ("manifest_test", manifest)):
        out = work / "eval" / run_name / f"{args.artifact}_{name}"
        cmd = CLI + ["evaluate", "--artifact", str(best), "--manifest", str(mf), "--split", "test", "--out",
                     str(out), "--json"]
        summary["commands"].append(shlex.join(cmd))
        ev = sh(cmd, logf, env)
        ev["argmax"] = argmax_summary(best, mf, "test")
        summary["evaluate"][name] = ev
    meta = json.loads((best / "model.json").read_text())
    summary["best_epoch"] = meta["summary"].get("best_epoch")  # an ensemble (seeds=N) has members instead
    summary["history"] = meta["summary"].get("history", [])
    summary["members"] = meta["summary"].get("members")
    (work / f"{run_name}_{args.artifact}.json").write_text(json.dumps(summary, indent=2, default=float))
    o = summary["evaluate"]["official_test"]
    log.info("official test: accuracy %.4f (argmax), AUROC %s, per class %s", o["argmax"]["accuracy"],
             o["argmax"]["auroc"], {k: (round(v["sensitivity"], 3), round(v["specificity"], 3))
                                    for k, v in o["argmax"]["argmax"].items()})
    print(json.dumps(summary, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
