"""`cxrray demo` with a smaller budget: every output exists and is sound."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from clusters import free_port
from cxrray.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from dicom_rank_bar import BUGS, rank_corr_under  # noqa: E402  (the decode bugs the bar must catch)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# The test split's mean AUROC on certain labels (uncertain and blank masked), the issue-11 bar
# for the default demo, held here at the smaller CI budget too. Under the training policy's
# U-Ones labels the same scores measure lower (about half of those "positives" have nothing in
# the picture): that cap is what the certain-label evaluation removes.
AUROC_BAR = 0.93


# The default demo (500 patients, 96 px, 8 epochs) measured 0.961 on certain labels, 0.893 under
# U-Ones' labels and 0.963 against truth.csv (2026-12-01). This smaller set (400 patients, 64 px)
# at 8 epochs gave 0.939 / 0.860 / 0.923: too near the bar, so it trains 12 epochs.
EPOCHS = 12
# Against what was drawn, faint findings (an uncertain label drawn weakly) count as present:
# the hardest positives there are, so this AUROC sits below the certain-label one.
TRUTH_BAR = 0.90
# The DICOM copy against its JPEG twins: Spearman per class, the lowest of the six. Correct
# decoding gave 0.989, 0.989, 0.986 and 0.991 (seeds 0, 0, 1, 2, alone) and 0.9675 (seed 0 in a
# full CI run, another model): the gap is the twin's own 8-bit quality-90 loss. Decode bugs on
# the same three models (benchmarks/dicom_rank_bar.py, 2026-12-07): MONOCHROME1 ignored -0.14 to
# -0.06, 12 bits read as 16 -0.24 to -0.01, gamma 2 0.49-0.68, a window left unapplied 0.63-0.79.
# The bar sits between the two, and the test checks that the mildest bug falls below it on the
# model it trained. (It was 0.97, from a single run of 0.990.)
RANK_CORR_BAR = 0.90


def test_demo_end_to_end(ray_session, tmp_path, capfd):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--n-patients", "400", "--size", "64", "--epochs", str(EPOCHS),
               "--port", str(free_port()), "--json"])
    assert rc == 0
    captured = capfd.readouterr()
    stdout = captured.out
    # In-process, capfd sees the summary, what is printed to sys.stdout/stderr and what native
    # code writes to fds 1 and 2 (cxrray's log lines go to pytest's log capture): no Ray chatter
    # may leak there, not even the C++ core worker's note on every actor pool (native_stderr.py).
    # The console of a real `cxrray train` subprocess is bounded in test_console.py.
    assert len((captured.out + captured.err).splitlines()) < 60, captured.out + captured.err
    assert "core_worker.cc" not in captured.out + captured.err, captured.err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert "test mean AUROC" in stdout and "bulk scoring" in stdout
    # 0: the resolved config beside the outputs
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["epochs"] == EPOCHS and saved["n_patients"] == 400 and saved["size"] == 64
    # 1-2: data and a patient-disjoint split
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert manifest.groupby("patient_id")["split"].nunique().max() == 1
    test_ids = set(manifest.loc[manifest["split"] == "test", "image_id"])
    # 3-4: a trained artifact that learned, and its evaluation
    assert summary["mean_auroc"] >= AUROC_BAR, summary
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert metrics["mean_auroc"] == pytest.approx(summary["mean_auroc"])
    assert metrics["labels"]["policy"] == "certain" and metrics["labels"]["training"].startswith("U-Ones")
    left_out = metrics["labels"]["excluded"]
    assert all(left_out[c]["uncertain"] + left_out[c]["blank"] > 0 for c in left_out)  # the masking happened
    by_labels = summary["auroc_by_labels"]
    assert by_labels["certain"] == summary["mean_auroc"]
    assert by_labels["train"] < by_labels["certain"], by_labels  # U-Ones' guesses cap the measurable AUROC
    assert by_labels["truth"] >= TRUTH_BAR, by_labels  # against what the generator drew (truth.csv)
    assert "against what was drawn" in stdout
    roc = Image.open(out / "evaluation" / "roc_curves.png")
    assert roc.size[0] > 300 and np.asarray(roc.convert("L")).std() > 5
    # 5: one Parquet row per test image, no errors
    preds = pd.read_parquet(out / "predictions")
    assert len(preds) == len(test_ids) and set(preds["image_id"]) == test_ids
    assert preds["error"].isna().all() and summary["score_errors"] == 0
    # 5b: the DICOM copy of the test split: every file scored, every row joins back to its JPEG
    # twin by SOP Instance UID, and the scores agree. The DICOM holds the phantom at 12 bits, the
    # JPEG at 8 bits and quality 90: that loss, not the DICOM decode, is the |dp| (uncompressed
    # DICOM differs from the JPEG as much as JPEG 2000 does, 0.006-0.010 mean at 12 epochs), and
    # it grows with the model's confidence. What a decode bug (an inverted MONOCHROME1, a wrong
    # rescale or bit shift) breaks is the ranking and the calls, so those carry the tight bars;
    # each syntax's pixels are checked exactly in test_synthetic_dicom.py.
    d = summary["dicom_copy"]
    assert d["images"] == d["joined"] == len(test_ids) and d["errors"] == 0, d
    assert len(d["syntaxes"]) >= 6, d["syntaxes"]
    assert d["min_rank_corr"] >= RANK_CORR_BAR and d["decision_agreement"] >= 0.98, d
    assert d["mean_abs_diff"] < 0.02 and d["max_abs_diff"] < 0.25, d
    # The bar catches a decode bug on this very model: the mildest one tried, a window left
    # unapplied (contrast halved), must fall below it.
    mild = "window left unapplied (contrast halved)"
    assert min(rank_corr_under(out, {mild: BUGS[mild]})[mild]) < RANK_CORR_BAR
    # 6: Serve answered over HTTP and the overlay decodes
    overlay = Image.open(out / "gradcam_overlay.png")
    overlay.load()
    assert overlay.size[0] >= 64 and overlay.mode in ("RGB", "RGBA")
    answer = json.loads((out / "predict.json").read_text())
    assert set(answer["classes"]) == set(summary_labels(out))
    assert summary["predict_latency_ms_p50"] > 0 and summary["url"] is None


def summary_labels(out):
    meta = json.loads((out / "runs" / "demo" / "artifacts" / "best" / "model.json").read_text())
    return meta["label_space"]["names"]
