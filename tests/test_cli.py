"""The console script: human summary, --json as the last stdout line, clear errors (exit 2)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from cxrray.cli import main
from cxrray.manifest import read_manifest


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_synth_then_manifest_with_split_and_leakage(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "syn"), "--n-patients", "30", "--size", "48", "--json"]) == 0
    synth = _last_json(capsys.readouterr().out)
    assert synth["n_patients"] == 30 and synth["n_images"] > 30
    rc = main(["manifest", "--source", "synthetic", "--root", str(tmp_path / "syn"), "--out",
               str(tmp_path / "m.parquet"), "--split", "0.6,0.2,0.2", "--no-official-split", "--json"])
    out = capsys.readouterr().out
    assert rc == 0 and "leakage check" in out and "splits:" in out
    summary = _last_json(out)
    assert summary["leakage"]["ok"] is True
    df, space = read_manifest(tmp_path / "m.parquet")
    assert len(df) == summary["n_images"] and set(df["split"]) == {"train", "valid", "test"}
    assert df.groupby("patient_id")["split"].nunique().max() == 1
    assert main(["leakage", "--manifest", str(tmp_path / "m.parquet"), "--strict", "--json"]) == 0
    # The raw labels: the synthetic train.csv holds uncertain (-1) and blank cells, kept as they are.
    cells = df[list(space.names)].to_numpy()
    assert space.raw_uncertain and (cells == -1).any() and np.isnan(cells).any()
    # --uncertainty was a manifest flag: it now says where the policy went, and writes nothing.
    rc = main(["manifest", "--source", "synthetic", "--root", str(tmp_path / "syn"), "--out",
               str(tmp_path / "m2.parquet"), "--uncertainty", "U-Ones", "--json"])
    assert rc == 2 and "training key" in _last_json(capsys.readouterr().out)["error"]
    assert not (tmp_path / "m2.parquet").exists()


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


# --- configs validated at the edge -----------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def test_bad_override_exits_2_in_one_line_before_ray_is_imported():
    # The console script's own code path (cxrray.cli.main), in a fresh interpreter that then
    # reports whether Ray or torch was ever imported.
    code = ("import sys; from cxrray.cli import main; rc = main(sys.argv[1:]); "
            "print(sorted(m for m in ('ray', 'torch') if m in sys.modules)); sys.exit(rc)")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, "train", "--config", "jobs/configs/synthetic_demo.yaml",
                          "lr=abc"], cwd=REPO, capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - start
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == "cxrray: error: lr: 'abc' is not a number"
    assert out.stdout.strip() == "[]"  # neither Ray nor torch: nothing started
    assert seconds < 10, f"took {seconds:.1f}s"
    console = subprocess.run([sys.executable, "-m", "cxrray.cli", "train", "--config",
                              "jobs/configs/synthetic_demo.yaml", "epochs=ten"], cwd=REPO, capture_output=True,
                             text=True, timeout=60)
    assert console.returncode == 2 and "epochs: 'ten' is not a whole number" in console.stderr


@pytest.mark.parametrize("argv, line", [
    (["train", "--config", "jobs/configs/synthetic_demo.yaml", "epoch=3"], "epoch: unknown key (did you mean epochs?)"),
    (["train", "--config", "jobs/configs/kermany2.yaml", "source_options={classes: 4}"],
     "source_options: classes: 4 is not one of 2, 3"),
    (["manifest", "--source", "kermany", "--root", "r", "--out", "m.parquet", "--views", "frontal"],
     "views: not an option of source 'kermany' (its options: classes, check_duplicates)"),
    (["demo", "--source", "nih"], "root: --source nih needs --root"),
    (["train", "--config", "nope.yaml"], "config nope.yaml does not exist"),
    (["train", "--config", "jobs/configs/synthetic_demo.yaml", "run_name=../escape"],
     "run_name: '../escape': not a folder name"),  # a run outside storage_path
])
def test_config_errors_are_one_line_and_exit_2(argv, line, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main([*argv, "--json"]) == 2
    captured = capsys.readouterr()
    assert line in captured.err and len(captured.err.strip().splitlines()) == 1
    assert line in _last_json(captured.out)["error"]


@pytest.mark.parametrize("argv", [
    ["manifest", "--source", "synthetic", "--root", "r", "--out", "m.parquet", "--split", "0.5,0.5"],
    ["evaluate", "--artifact", "a", "--manifest", "m", "--out", "o", "--bootstrap", "x"],
    ["demo", "--model", "resnet18"],
])
def test_wrong_flag_values_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "error: argument --" in capsys.readouterr().err


@pytest.mark.parametrize("command", [
    ["score", "--input", "in", "--out", "out"],
    ["serve"],
    ["evaluate", "--manifest", "m.parquet", "--out", "ev"],
])
def test_missing_artifact_is_refused_at_the_edge(command, tmp_path, capsys):
    argv = [command[0], "--artifact", str(tmp_path / "nonexistent"), *command[1:]]
    argv = [a if a not in ("in", "out", "m.parquet", "ev") else str(tmp_path / a) for a in argv]
    (tmp_path / "in").mkdir()
    assert main([*argv, "--json"]) == 2
    err = _last_json(capsys.readouterr().out)["error"]
    assert "nonexistent" in err and "not a cxrray artifact" in err


def test_help_lists_every_key_with_default_and_meaning():
    from cxrray.config import ManifestConfig, TrainConfig
    from cxrray.job_configs import ScoreConfig

    def help_of(*cmd: str) -> str:
        return subprocess.run([sys.executable, "-m", "cxrray.cli", *cmd, "--help"], capture_output=True, text=True,
                              check=True, cwd=REPO).stdout

    train = help_of("train")
    for key in TrainConfig.__pydantic_fields__:
        assert f"\n  {key} " in train, key
    assert "default 0.001  peak learning rate" in train and "default densenet121" in train
    score = " ".join(help_of("score").split())
    for key in ScoreConfig.__pydantic_fields__:
        assert "--" + key.replace("_", "-") in score, key
    assert "images per forward pass (default: 32)" in score
    manifest = " ".join(help_of("manifest").split())
    for flag in ("--no-check-files", "--no-leakage-check", "--no-hash", "--no-official-split", "--on-leakage",
                 "--join-on"):
        assert flag in manifest
    assert len(ManifestConfig.__pydantic_fields__) > 20


def _leaky_csv(tmp_path: Path) -> Path:
    """Six patients; valid's and test's only images are byte-identical: a leak by content."""
    import numpy as np
    from PIL import Image

    rows, rng = [], np.random.default_rng(0)
    for i in range(6):
        name = f"p{i}.png"
        pixels = rng.integers(0, 255, (16, 16), dtype=np.uint8) if i != 5 else None
        if i == 5:
            (tmp_path / name).write_bytes((tmp_path / "p4.png").read_bytes())
        else:
            Image.fromarray(pixels).save(tmp_path / name)
        rows.append({"path": name, "Edema": i % 2, "patient": f"P{i}",
                     "split": {4: "valid", 5: "test"}.get(i, "train")})
    csv = tmp_path / "labels.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def test_train_builds_its_manifest_with_the_leakage_check_of_cxrray_manifest(tmp_path, capsys, caplog):
    from cxrray.config import TrainConfig, load_config
    from cxrray.manifest_build import LeakageRefused
    from cxrray.train import ensure_manifest

    csv = _leaky_csv(tmp_path)
    options = "source_options={label_cols: [Edema], patient_col: patient, split_col: split"
    base = ["source=csv", f"root={csv}", "model=small_cnn"]
    # cxrray manifest reports the leak ...
    assert main(["manifest", "--source", "csv", "--root", str(csv), "--label-cols", "Edema", "--patient-col", "patient",
                 "--split-col", "split", "--out", str(tmp_path / "m.parquet"), "--json"]) == 0
    assert _last_json(capsys.readouterr().out)["leakage"]["ok"] is False
    # ... and so does the manifest `cxrray train` builds: a warning naming the leak
    cfg = load_config(TrainConfig, None, [*base, f"manifest={tmp_path / 'train_m.parquet'}", options + "}"])
    with caplog.at_level("WARNING", logger="cxrray"):
        path = ensure_manifest(cfg)
    assert Path(path).exists()
    assert any("leaks" in r.getMessage() and "byte-identical" in r.getMessage() for r in caplog.records)
    # on_leakage=refuse: both refuse, the same way, and neither writes the manifest
    refuse = load_config(TrainConfig, None, [*base, f"manifest={tmp_path / 'r.parquet'}",
                                             options + ", on_leakage: refuse}"])
    with pytest.raises(LeakageRefused, match="LEAK"):
        ensure_manifest(refuse)
    assert not (tmp_path / "r.parquet").exists()
    assert main(["manifest", "--source", "csv", "--root", str(csv), "--label-cols", "Edema", "--patient-col", "patient",
                 "--split-col", "split", "--on-leakage", "refuse", "--out", str(tmp_path / "r2.parquet")]) == 2
    assert not (tmp_path / "r2.parquet").exists()


def test_evaluate_saves_its_resolved_config_beside_the_report(tmp_path, capsys, monkeypatch):
    import cxrray.evaluate
    from test_serve import make_artifact

    artifact = make_artifact(tmp_path / "artifact")
    seen = {}

    def fake_evaluate(**kwargs):  # the metrics are evaluate's own tests'; here: what the CLI hands it
        from types import SimpleNamespace

        seen.update(kwargs)
        metrics = SimpleNamespace(mean_auroc=0.5, accuracy=None, per_class=[])
        return SimpleNamespace(model_id="m", n_images=0, n_errors=0, metrics=metrics, to_dict=lambda: {},
                               outputs={"markdown": "r.md", "roc_curves": "roc.png"})

    monkeypatch.setattr(cxrray.evaluate, "evaluate", fake_evaluate)
    out = tmp_path / "ev"
    assert main(["evaluate", "--artifact", str(artifact), "--manifest", str(tmp_path / "m.parquet"), "--out", str(out),
                 "--split", "valid", "--bootstrap", "10", "--json"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["split"] == "valid" and saved["bootstrap"] == 10 and saved["gallery_k"] == 4
    assert seen["out_dir"] == str(out) and seen["split"] == "valid" and seen["bootstrap"] == 10
    assert _last_json(capsys.readouterr().out) == {}  # the summary is metrics.json's content, nothing added


@pytest.mark.ray
def test_score_saves_its_resolved_config_and_resumes_past_it(ray_session, tmp_path, capsys):
    from PIL import Image

    from cxrray.score import read_predictions
    from test_serve import make_artifact, xray_like

    artifact = make_artifact(tmp_path / "artifact")
    (tmp_path / "in").mkdir()
    for i in range(3):
        Image.fromarray(xray_like(i, 64)).save(tmp_path / "in" / f"{i}.png")
    argv = ["score", "--artifact", str(artifact), "--input", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
            "--actors", "1", "--batch-size", "2", "--json"]
    assert main(argv) == 0
    saved = yaml.safe_load((tmp_path / "out" / "_config.yaml").read_text())
    assert saved["artifact"] == str(artifact) and saved["batch_size"] == 2 and saved["actors"] == 1
    assert saved["chunk_size"] == 1024  # the defaults are part of the resolved config
    # the config file is not a part: a re-run finds the output complete, the reader ignores it
    assert main(argv) == 0
    summary = _last_json(capsys.readouterr().out)
    assert summary["complete"] and summary["scored_this_run"] == 0 and summary["rows"] == 3
    assert len(read_predictions(tmp_path / "out")) == 3


def test_evaluate_and_train_refuse_bad_outputs_manifests_and_weights_in_one_line(tmp_path, capsys):
    """A file where --out should be, a manifest without a split column, and weights that do not
    match model.json's sha256: each was a traceback (FileExistsError, KeyError 'split', a
    KeyError from torch.load in every scoring actor)."""
    import shutil

    from test_serve import make_artifact

    from cxrray.artifact import ArtifactError, check_local_weights
    from cxrray.evaluate import split_rows
    from cxrray.labels import SYNTHETIC_FINDINGS, LabelSpace
    from cxrray.manifest import ManifestError, write_manifest
    from cxrray.train import NoReadableImages

    artifact = make_artifact(tmp_path / "art")
    space = LabelSpace(SYNTHETIC_FINDINGS)
    df = pd.DataFrame({"image_id": ["a"], "path": ["/x/a.png"], "patient_id": ["p"],
                       **{c: [0.0] for c in space.columns}})
    import pyarrow.parquet as pq

    nosplit = write_manifest(df, space, tmp_path / "nosplit.parquet")
    table = pq.read_table(nosplit)
    if "split" in table.column_names:  # a manifest written by hand, or by another tool: no split
        pq.write_table(table.drop(["split"]).replace_schema_metadata(table.schema.metadata), nosplit)
    from cxrray.artifact import read_meta

    with pytest.raises(ManifestError, match="has no split column"):
        split_rows(nosplit, "test", read_meta(artifact))
    (tmp_path / "afile").write_text("x")
    assert main(["evaluate", "--artifact", str(artifact), "--manifest", str(nosplit), "--out",
                 str(tmp_path / "afile"), "--json"]) == 2
    assert "is a file" in _last_json(capsys.readouterr().out)["error"]
    torn = tmp_path / "torn"
    shutil.copytree(artifact, torn)
    (torn / "model.pt").write_bytes(b"junk")
    with pytest.raises(ArtifactError, match="does not match the sha256"):
        check_local_weights(torn)
    check_local_weights(artifact)  # the intact one passes
    assert issubclass(NoReadableImages, ValueError)  # the CLI prints it as one line
