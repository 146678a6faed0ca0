"""The console script: human summary, --json as the last stdout line, clear errors (exit 2)."""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from cxrray.cli import main
from cxrray.manifest import read_manifest


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_synth_then_manifest_with_split_and_leakage(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "syn"), "--n-patients", "30", "--size", "48", "--json"]) == 0
    synth = _last_json(capsys.readouterr().out)
    assert synth["n_patients"] == 30 and synth["n_images"] > 30
    rc = main(["manifest", "--source", "synthetic", "--root", str(tmp_path / "syn"), "--out",
               str(tmp_path / "m.parquet"), "--split", "0.6,0.2,0.2", "--no-official-split",
               "--uncertainty", "U-Ones", "--json"])
    out = capsys.readouterr().out
    assert rc == 0 and "leakage check" in out and "splits:" in out
    summary = _last_json(out)
    assert summary["leakage"]["ok"] is True
    df, space = read_manifest(tmp_path / "m.parquet")
    assert len(df) == summary["n_images"] and set(df["split"]) == {"train", "valid", "test"}
    assert df.groupby("patient_id")["split"].nunique().max() == 1
    assert main(["leakage", "--manifest", str(tmp_path / "m.parquet"), "--strict", "--json"]) == 0


def test_missing_column_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"file": ["a.png"], "Edema": [1]}).to_csv(csv, index=False)
    rc = main(["manifest", "--source", "csv", "--root", str(csv), "--label-cols", "Edema", "--out",
               str(tmp_path / "m.parquet"), "--json"])
    assert rc == 2
    err = _last_json(capsys.readouterr().out)["error"]
    assert "labels.csv" in err and "'path'" in err


def test_wrong_path_is_a_clear_error(tmp_path, capsys):
    rc = main(["manifest", "--source", "kermany", "--root", str(tmp_path / "nope"), "--out",
               str(tmp_path / "m.parquet"), "--json"])
    assert rc == 2
    assert "nope" in _last_json(capsys.readouterr().out)["error"]


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "cxrray.cli", "--help"], capture_output=True, text=True, check=True)
    for sub in ("demo", "synth", "manifest", "prepare", "train", "evaluate", "score", "serve"):
        assert sub in out.stdout


@pytest.mark.realdata
def test_real_chexpert_manifest_from_cli(shared_data, tmp_path, capsys):
    rc = main(["manifest", "--source", "chexpert", "--root", str(shared_data / "chexpert" / "train.csv.gz"),
               "--out", str(tmp_path / "c.parquet"), "--no-check-files", "--no-leakage-check", "--json"])
    assert rc == 0
    s = _last_json(capsys.readouterr().out)
    assert s["n_images"] == 223_414 and s["n_patients"] == 64_540
