"""Pointing-game budgets (not a test): tests/test_explain.py's fixture and scoring, with overrides.

What a cheaper training would give the Grad-CAM pointing game: the fixture's synthetic data,
`quick_train` and the test's hit rule, with any of its settings overridden, timed, one JSON line.

    python benchmarks/pointing_budget.py                      # the test's own budget
    python benchmarks/pointing_budget.py size=96              # or model=tiny_cnn, epochs=8, n_patients=1600
    python benchmarks/pointing_budget.py warm_epochs=8 warm_size=64     # progressive resizing

Results (2026-12-01, 2-core CPU, seed 0) are in the comment above the test's POINTING budget.
"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # quick_train
import torch
from quick_train import quick_train
from cxrray.predict import Predictor
from cxrray.sources import load_source
from cxrray.sources.synthetic import SynthConfig, write_synthetic_chexpert
from test_explain import POINTING, pointing_game

cfg = {"seed": 0, "warm_size": 64, "warm_epochs": 0, **POINTING}  # the test's budget, then the overrides
WORK = "/tmp/pointing_budget"
for a in sys.argv[1:]:
    k, v = a.split("=")
    cfg[k] = type(cfg[k])(v) if not isinstance(cfg[k], float) else float(v)
out = Path(WORK) / f"run_{'_'.join(sys.argv[1:]) or 'base'}"
t0 = time.time()
synth = write_synthetic_chexpert(out / "data", SynthConfig(n_patients=cfg["n_patients"], size=cfg["size"], seed=0,
    valid_fraction=cfg["valid_fraction"], lateral_fraction=0.0, max_studies=1), progress=False)
source = load_source("synthetic", out / "data", check_files=False)
t1 = time.time()
torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
artifact = quick_train(source.manifest, source.label_space, out / "artifact", model=cfg["model"], size=cfg["size"],
                       epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"], seed=cfg["seed"], loss=cfg["loss"],
                       warm_size=cfg["warm_size"], warm_epochs=cfg["warm_epochs"])
t2 = time.time()
hits, shuf, per = pointing_game(Predictor(artifact, device="cpu"), source.manifest, synth.boxes_csv, cfg["size"])
t3 = time.time()
print(json.dumps({"cfg": sys.argv[1:], "pointing": round(float(hits.mean()), 3), "n": int(len(hits)), "shuffled": round(float(shuf.mean()), 3),
                  "per": per, "t_data": round(t1 - t0), "t_train": round(t2 - t1), "t_eval": round(t3 - t2)}))
