"""Can a small CNN learn the synthetic chest X-rays? If not, the generator (or the pipeline) is broken.

Result, 2026-11-23, machine "2-core CPU" (shared with other workers, load average 14-70):

    .venv/bin/python benchmarks/synthetic_learnability.py            # = --seed 0
    743 images (454 train / 100 held-out frontal), 6 epochs
    held-out AUROC  Cardiomegaly 0.984  Lung Lesion 0.957  Consolidation 0.968
                    Pneumothorax 0.996  Pleural Effusion 0.990  Support Devices 1.000
    mean 0.982, min 0.957; 192 s wall, 51 s user CPU (wall inflated by the other load;
    the same run at a quieter moment took 14 s)
    --seed 2: mean 0.946, min 0.859 (Consolidation);  --seed 3: mean 0.967, min 0.878

2026-12-01, same machine (shared with other jobs), with truth.csv beside the labels:

    .venv/bin/python benchmarks/synthetic_learnability.py --threads 1
    mean AUROC 0.977 on labels (uncertain masked, blank negative), 0.940 against truth.csv
    (faint uncertain findings count as present there: Lung Lesion 0.943 -> 0.852,
    Pneumothorax 0.999 -> 0.901); 41 s
    mean-pixel AUROC per finding: 0.50-0.61 (0.71 once, Lung Lesion on 8 positives);
    on 600 patients all six lie in 0.51-0.56.

Plain torch, no Ray: generate the synthetic CheXpert set, train a 4-block CNN on the frontal
images of train.csv (uncertain -1 masked as NaN, blank = negative), and report per-finding
AUROC on a patient-held-out 20%, against those labels and against truth.csv (what was drawn). Beside it, the AUROC of the image's mean intensity: if that
alone separated a finding, the finding would be too trivial to prove anything.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch import nn

from cxrray.labels import SYNTHETIC_FINDINGS
from cxrray.sources.synthetic import SynthConfig, read_truth, write_synthetic_chexpert


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patients", type=int, default=400)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="where to write the data (default: a temp dir)")
    return p.parse_args(argv)


def load_data(root: Path, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Frontal images of train.csv as (N,1,H,W) float32, labels (N,C) with NaN for -1, patient
    ids, and the truth (N,C): 1 where truth.csv says the finding was drawn (present or faint)."""
    df = pd.read_csv(root / "train.csv")
    df = df[df["Frontal/Lateral"] == "Frontal"].reset_index(drop=True)
    base = root.parent
    x = np.stack([np.asarray(Image.open(base / p), dtype=np.float32) for p in df["Path"]])[:, None] / 255.0
    y = df[list(SYNTHETIC_FINDINGS)].to_numpy(dtype=np.float32)
    y = np.where(y == -1.0, np.nan, np.nan_to_num(y, nan=0.0))  # blank = unmentioned = negative
    patients = df["Path"].str.split("/").str[2].to_numpy()
    truth = read_truth(root / "truth.csv").loc[df["Path"]]
    drawn = np.stack([(truth[n] != "absent").to_numpy(np.float32) for n in SYNTHETIC_FINDINGS], axis=1)
    return x, y, patients, drawn


def patient_split(patients: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.unique(patients)
    held = set(np.random.default_rng(seed).permutation(ids)[: max(1, round(len(ids) * fraction))])
    test = np.array([p in held for p in patients])
    return np.flatnonzero(~test), np.flatnonzero(test)


def small_cnn(n_out: int) -> nn.Module:
    def block(i: int, o: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(block(1, 16), block(16, 32), block(32, 64), block(64, 128))
            self.head = nn.Linear(256, n_out)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.features(x)
            # Max pooling keeps small local findings (a nodule) that averaging would dilute.
            return self.head(torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1))

    return Net()


def masked_bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    known = ~torch.isnan(y)
    return nn.functional.binary_cross_entropy_with_logits(logits[known], y[known])


def train_one_epoch(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                    batch: int, gen: torch.Generator) -> float:
    model.train()
    order, total = torch.randperm(len(x), generator=gen), 0.0
    for i in range(0, len(x), batch):
        idx = order[i : i + batch]
        loss = masked_bce(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
    return total / len(x)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: np.ndarray) -> dict[str, float]:
    model.eval()
    p = torch.cat([torch.sigmoid(model(x[i : i + 256])) for i in range(0, len(x), 256)]).numpy()
    return auroc_per_finding(p, y)


def auroc_per_finding(scores: np.ndarray, y: np.ndarray) -> dict[str, float]:
    out = {}
    for c, name in enumerate(SYNTHETIC_FINDINGS):
        known = ~np.isnan(y[:, c])
        t = y[known, c]
        out[name] = float(roc_auc_score(t, scores[known, c])) if 0 < t.sum() < len(t) else float("nan")
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        summary = write_synthetic_chexpert(out, SynthConfig(n_patients=args.patients, size=args.size, seed=args.seed))
        x, y, patients, drawn = load_data(summary.root, args.size)
    t_gen = time.perf_counter() - t0
    tr, te = patient_split(patients, 0.2, args.seed)
    mean, std = x[tr].mean(), x[tr].std()
    xt = torch.from_numpy((x - mean) / std)
    model = small_cnn(len(SYNTHETIC_FINDINGS))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        loss = train_one_epoch(model, opt, xt[tr], torch.from_numpy(y[tr]), args.batch, gen)
        print(f"epoch {epoch + 1}/{args.epochs}  loss {loss:.4f}  {time.perf_counter() - t0:.0f}s", flush=True)
    auc = evaluate(model, xt[te], y[te])
    truth_auc = evaluate(model, xt[te], drawn[te])  # against what was drawn: faint uncertain findings count
    base = auroc_per_finding(np.repeat(x[te].mean((1, 2, 3))[:, None], len(SYNTHETIC_FINDINGS), 1), y[te])
    seconds = time.perf_counter() - t0
    print(f"\n{summary.n_images} images ({len(tr)} train / {len(te)} held-out frontal), generated in {t_gen:.1f}s")
    print(f"{'finding':<18} {'pos':>4} {'CNN AUROC':>10} {'vs truth':>9} {'mean-pixel AUROC':>17}")
    for c, name in enumerate(SYNTHETIC_FINDINGS):
        pos = int(np.nansum(y[te, c]))
        print(f"{name:<18} {pos:>4} {auc[name]:>10.3f} {truth_auc[name]:>9.3f} {max(base[name], 1 - base[name]):>17.3f}")
    mean_auc = float(np.nanmean(list(auc.values())))
    mean_truth = float(np.nanmean(list(truth_auc.values())))
    print(f"mean AUROC {mean_auc:.3f} on labels (uncertain masked, blank negative), {mean_truth:.3f} against "
          f"truth.csv; min {min(auc.values()):.3f}, total {seconds:.0f}s")
    args_text = " ".join(argv if argv is not None else sys.argv[1:])
    print(f"command: python benchmarks/synthetic_learnability.py {args_text}".rstrip())
    return {**auc, "mean": mean_auc, "mean_truth": mean_truth, "seconds": seconds}


if __name__ == "__main__":
    main()
