"""AUC-margin loss against BCE/CE, side by side (not a test): LibAUC's two-stage recipe.

Stage 1 trains with the dataset's usual loss (BCE for the synthetic findings, CE for Kermany).
Stage 2 starts from stage 1's best artifact (`init_from`) for the same number of epochs and
learning rate twice: once with the stage-1 loss (the baseline: the same budget, no AUCM) and
once with `loss=aucm`. All three are evaluated on the test split, certain labels only, through
the product CLI (`cxrray train`, `cxrray evaluate`) on a private Ray head.

    python benchmarks/aucm_vs_bce.py --dataset synthetic --work /tmp/aucm_syn
    python benchmarks/aucm_vs_bce.py --dataset kermany2 --work /tmp/aucm_k2

Results: benchmarks/results/kermany.md (Kermany) and benchmarks/results/aucm.md (synthetic).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from kermany_quality import CLI, RayHead, sh  # noqa: E402 - the same subprocess and private-head helpers

log = logging.getLogger("aucm_vs_bce")

DATASETS = {
    # config, stage-1 overrides, stage-1 loss
    "synthetic": ("jobs/configs/synthetic_demo.yaml", ["image_size=64", "epochs=6"], "bce"),
    "kermany2": ("jobs/configs/kermany2.yaml", ["epochs=8"], "ce"),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(DATASETS), default="synthetic")
    p.add_argument("--work", required=True)
    p.add_argument("--stage2-epochs", type=int, default=4)
    p.add_argument("--stage2-lr", type=float, default=2e-4)
    p.add_argument("--patients", type=int, default=500, help="synthetic: patients to generate")
    p.add_argument("--ray-port", type=int, default=6393)
    p.add_argument("--ray-cpus", type=int, default=4)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    logf = work / "aucm_vs_bce.log"
    config, stage1, loss = DATASETS[args.dataset]
    data = []
    if args.dataset == "synthetic":
        root = work / "synthetic"
        if not root.exists():
            sh(CLI + ["synth", "--out", str(root), "--n-patients", str(args.patients), "--size", "64", "--json"],
               logf, env)
        data = [f"root={root}", f"manifest={work / 'manifest.parquet'}"]
    else:
        data = [f"manifest={work / 'manifest.parquet'}"]
    runs = {"stage1": stage1 + [f"loss={loss}"]}
    best1 = work / "runs" / "stage1" / "artifacts" / "best"
    s2 = [f"init_from={best1}", f"epochs={args.stage2_epochs}", f"lr={args.stage2_lr}", "warmup_epochs=0"]
    runs[f"stage2_{loss}"] = s2 + [f"loss={loss}"]
    runs["stage2_aucm"] = s2 + ["loss=aucm"]
    results: dict = {"dataset": args.dataset, "config": config, "date": time.strftime("%Y-%m-%d"), "runs": {}}
    head = RayHead(args.ray_port, args.ray_cpus, f"/tmp/ray_aucm_{args.ray_port}", env)
    try:
        time.sleep(5)
        for name, overrides in runs.items():
            t0 = time.time()
            train = sh(CLI + ["train", "--config", config, *data, f"storage_path={work / 'runs'}", f"run_name={name}",
                              f"ray_address={head.address}", "tracking=false", *overrides, "--json"], logf, env)
            seconds = time.time() - t0
            art = work / "runs" / name / "artifacts" / "best"
            ev = sh(CLI + ["evaluate", "--artifact", str(art), "--manifest", str(work / "manifest.parquet"),
                           "--split", "test", "--out", str(work / "eval" / name), "--bootstrap", "500",
                           "--gallery-k", "0", "--ray-address", head.address, "--json"], logf, env)
            results["runs"][name] = {"overrides": overrides, "train_s": round(seconds), "val_mean_auroc":
                                     train["best_val_mean_auroc"], "test_mean_auroc": ev["mean_auroc"],
                                     "test_accuracy": ev["accuracy"],
                                     "test_auroc": {k: v["auroc"] for k, v in ev["per_class"].items()},
                                     "test_auroc_ci": {k: v["auroc_ci"] for k, v in ev["per_class"].items()}}
            log.info("%s: val %.4f test %.4f (%ds)", name, train["best_val_mean_auroc"], ev["mean_auroc"], seconds)
    finally:
        head.stop()
    (work / "aucm_vs_bce.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
