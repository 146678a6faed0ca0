"""Bulk scoring: input listing and resume bookkeeping (pure, milliseconds), then the Ray job
end to end on the session cluster, then kill-and-resume of a real driver process."""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cxrray import score
from cxrray.score import (
    OutputConflict,
    InputError,
    PartWriter,
    ScoreConfig,
    list_inputs,
    output_schema,
    plan_resources,
    scan_output,
)
from cxrray.score.store import read_predictions

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers


def write_png(path: Path, size: int = 48, seed: int = 0, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path, format="PNG" if path.suffix.lower() != ".jpg" else "JPEG")
    return path


def png_declaring(width: int, height: int) -> bytes:
    """A well-formed PNG header claiming a huge image (a decompression bomb's shape)."""
    def chunk(t: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + t + data + struct.pack(">I", zlib.crc32(t + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def dicom_bytes(arr: np.ndarray) -> bytes:
    """A 12-bit-in-16 DX file around `arr` (the DICOM builder lives in test_imaging)."""
    from tests.test_imaging import make_dicom

    return make_dicom(arr.astype(np.uint16), BitsStored=12, HighBit=11)


def make_artifact(path: Path, seed: int = 0, config: dict | None = None) -> Path:
    """An untrained small_cnn artifact; `config` is the training config model.json records."""
    import torch

    from cxrray.artifact import ModelMeta, save_artifact
    from cxrray.labels import SYNTHETIC_FINDINGS, LabelSpace
    from cxrray.models import build_model, gradcam_layer_path
    from cxrray.transforms import Preprocess

    torch.manual_seed(seed)
    pre, space = Preprocess(size=64, channels=1), LabelSpace(SYNTHETIC_FINDINGS)
    net = build_model("small_cnn", space.num_outputs, pre)
    meta = ModelMeta("small_cnn", space, pre, [0.5] * space.num_classes, gradcam_layer_path("small_cnn"),
                     config=config or {})
    return save_artifact(path, net, meta)


def run_main(capsys, *argv: str) -> tuple[int, dict]:
    rc = score.main([*argv, "--json"])
    return rc, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("art") / "model")


@pytest.fixture(scope="module")
def other_artifact(tmp_path_factory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("art2") / "model", seed=1)


def test_a_read_only_batch_scores_without_a_warning_and_is_left_untouched(artifact: Path) -> None:
    """Ray hands a batch over as a read-only view of its object store; torch.from_numpy warned
    on every such batch. The predictor copies only such a batch, and scores it the same."""
    import warnings

    from cxrray.predict import Predictor

    p = Predictor(artifact, num_threads=1)
    batch = np.random.default_rng(0).integers(0, 256, (3, 1, 64, 64), dtype=np.uint8)
    frozen = batch.copy()
    frozen.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        probs = p.predict_images(frozen)
    np.testing.assert_allclose(probs, p.predict_images(batch), atol=1e-6)
    np.testing.assert_array_equal(frozen, batch)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("archive")
    for i in range(60):
        write_png(root / f"s{i % 4}" / f"img{i:03d}.png", seed=i)
    return root


# --------------------------------------------------------------------------- input listing


def test_folder_listing_is_recursive_sorted_and_skips_non_images(tmp_path: Path) -> None:
    for rel in ("b/x.png", "a/y.JPG", "a/z.dcm", "c/IM000001", "c/1.2.840.10008.99", "c/scan.dicom", "top.jpeg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    for rel in ("notes.txt", "a/labels.csv", ".hidden.png", ".git/obj.png", "c/DICOMDIR"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    df = list_inputs(str(tmp_path))
    assert df["image_id"].tolist() == ["a/y.JPG", "a/z.dcm", "b/x.png", "c/1.2.840.10008.99", "c/IM000001",
                                       "c/scan.dicom", "top.jpeg"]
    assert all(Path(p).is_absolute() and Path(p).exists() for p in df["path"])


def test_glob_csv_parquet_and_uri_inputs(tmp_path: Path) -> None:
    root = tmp_path / "arc"
    for rel in ("p1/a.png", "p1/b.png", "p2/c.png"):
        write_png(root / rel)
    g = list_inputs(str(root / "**" / "*.png"))
    assert g["image_id"].tolist() == ["p1/a.png", "p1/b.png", "p2/c.png"]
    # CSV paths are relative to the CSV; duplicates of the same file collapse to one input.
    (root / "list.csv").write_text("path\np1/a.png\np2/c.png\np2/c.png\n")
    c = list_inputs(str(root / "list.csv"))
    assert c["path"].tolist() == [str(root / "p1/a.png"), str(root / "p2/c.png")]
    pd.DataFrame({"image_id": ["x", "y"], "path": [str(root / "p1/a.png"), "s3://bucket/k.png"]}).to_parquet(
        tmp_path / "m.parquet")
    assert list_inputs(str(tmp_path / "m.parquet"))["path"].tolist()[1] == "s3://bucket/k.png"
    # Object stores go through pyarrow.fs; file:// exercises the same code without a network.
    u = list_inputs(f"file://{root}")
    assert u["image_id"].tolist() == ["p1/a.png", "p1/b.png", "p2/c.png"]
    assert u["path"].iloc[0] == f"file://{root}/p1/a.png"


def test_inputs_that_cannot_be_scored_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no images"):
        list_inputs(str(tmp_path))
    with pytest.raises(InputError, match="no such"):
        list_inputs(str(tmp_path / "nope"))
    (tmp_path / "l.csv").write_text("image_id,path\nsame,/a.png\nsame,/b.png\n")
    with pytest.raises(InputError, match="unique image_id"):
        list_inputs(str(tmp_path / "l.csv"))
    (tmp_path / "n.csv").write_text("file\n/a.png\n")
    with pytest.raises(InputError, match="'path' column"):
        list_inputs(str(tmp_path / "n.csv"))


def test_listing_odd_but_valid_inputs(tmp_path: Path, caplog) -> None:
    """A folder whose name looks like a glob; one file written three ways in a CSV; files left
    out by name are counted in a warning (a folder of TIFFs must not look scored)."""
    import logging

    batch = tmp_path / "batch[1]"
    write_png(batch / "a.png")
    (batch / "scan.tif").write_bytes(b"II*\0")
    (batch / "notes.txt").write_text("x")
    with caplog.at_level(logging.WARNING, logger="cxrray.score.inputs"):
        assert list_inputs(str(batch))["image_id"].tolist() == ["a.png"]
    assert any("left out 2 files" in r.getMessage() and ".tif 1" in r.getMessage() for r in caplog.records)
    (tmp_path / "l.csv").write_text(f"path\n{batch}/a.png\n{batch}/./a.png\n{tmp_path}/x/../batch[1]/a.png\n")
    assert list_inputs(str(tmp_path / "l.csv"))["path"].tolist() == [str(batch / "a.png")]
    (tmp_path / "upper.csv").write_text(f"PATH\n{batch}/a.png\n")  # a header in any case
    assert list_inputs(str(tmp_path / "upper.csv"))["path"].tolist() == [str(batch / "a.png")]
    (tmp_path / "latin.csv").write_bytes("path\ncaf\xe9.png\n".encode("latin-1"))
    with pytest.raises(InputError, match="latin.csv: cannot be read as a UTF-8 CSV"):
        list_inputs(str(tmp_path / "latin.csv"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="bad.parquet: cannot be read as Parquet"):
        list_inputs(str(tmp_path / "bad.parquet"))


def test_a_csv_with_two_path_columns_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_text("Path,path\n/a.png,/b.png\n")
    with pytest.raises(InputError, match="all mean 'path'"):
        list_inputs(str(tmp_path / "l.csv"))


def test_files_that_cannot_be_scored_are_listed_with_their_problem_and_the_output_folder_is_not(
        tmp_path: Path) -> None:
    write_png(tmp_path / "ok.png")
    write_png(tmp_path / os.fsdecode(b"caf\xe9.png"))
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "preds").mkdir()
    (tmp_path / "preds" / "_lock").write_bytes(b"")  # the job's own output, inside its input
    df = list_inputs(str(tmp_path), exclude=str(tmp_path / "preds")).set_index("image_id")
    assert sorted(df.index) == ["caf\\xe9.png", "ok.png", "pipe.png"]
    assert pd.isna(df.loc["ok.png", "problem"])
    assert df.loc["caf\\xe9.png", "problem"].startswith("bad_name: ")
    assert df.loc["pipe.png", "problem"].startswith("not_a_file: ")
    assert "preds/_lock" in list_inputs(str(tmp_path))["image_id"].tolist()  # without exclude it would be


# --------------------------------------------------------------------------- output bookkeeping


SCHEMA = output_schema(["p_a", "p_b"])


def result_batch(ids: list[str], errors: list[str | None] | None = None) -> pa.Table:
    errors = errors or [None] * len(ids)
    n = len(ids)
    return pa.table({"image_id": ids, "path": [f"/x/{i}" for i in ids], "p_a": np.full(n, 0.25, np.float32),
                     "p_b": np.full(n, np.nan, np.float32), "positive": [[] for _ in ids],
                     "model_id": ["m1"] * n, "error": errors})


def parts_on_disk(out: Path) -> list[int]:
    """Indices of the part files in `out`, after checking each has its commit record."""
    names = sorted(n for n in os.listdir(out) if n.startswith("part-"))
    records = sorted(os.listdir(out / score.COMMITS)) if (out / score.COMMITS).is_dir() else []
    assert records == [n.replace(".parquet", ".json") for n in names], (names, records)
    return [int(n.split("-")[1].split(".")[0]) for n in names]


def test_part_writer_routes_rows_to_chunks_drops_duplicates_and_nulls_failed_probs(tmp_path: Path) -> None:
    ids = [f"id{i:02d}" for i in range(10)]
    w = PartWriter(tmp_path, ids, chunk_size=4, first_part=3, schema=SCHEMA, model_id="m1", label_space={})
    # Out of order, with a retried batch re-sending rows: chunks are [0-3], [4-7], [8-9].
    assert w.add(result_batch(["id09", "id01", "id05"], [None, "corrupt: /x: bad", None])) == 3
    assert w.add(result_batch(["id00", "id02", "id03", "id01"])) == 3  # id01 again: dropped
    assert parts_on_disk(tmp_path) == [3]
    assert w.add(result_batch(["id08", "id04", "id06", "id07", "id03"])) == 4  # id03: chunk already on disk
    assert parts_on_disk(tmp_path) == [3, 4, 5]
    df = pd.read_parquet(tmp_path)
    assert list(df.columns) == SCHEMA.names and len(df) == 10 and df["image_id"].is_unique
    bad = df.set_index("image_id").loc["id01"]
    assert pd.isna(bad["p_a"]) and bad["error"].startswith("corrupt")
    part3 = next(tmp_path.glob("part-00003-*.parquet"))
    assert pq.read_table(part3)["p_a"].null_count == 1  # null, not NaN
    assert w.duplicates == 2 and w.rows_written == 10


def test_partial_chunks_are_flushed_on_failure(tmp_path: Path) -> None:
    w = PartWriter(tmp_path, ["a", "b", "c"], chunk_size=3, first_part=0, schema=SCHEMA, model_id="m1",
                   label_space={})
    w.add(result_batch(["a"]))
    w.flush()
    assert pd.read_parquet(tmp_path)["image_id"].tolist() == ["a"]


def _part(out: Path, index: int, ids: list[str], model_id: str = "m1") -> None:
    out.mkdir(parents=True, exist_ok=True)
    PartWriter(out, ids, len(ids), index, SCHEMA, model_id, {}).add(result_batch(ids))


def test_scan_output_resumes_cleans_up_and_refuses_another_model(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert scan_output(out, "m1", SCHEMA, force_model=False).done == set()
    _part(out, 0, ["a", "b"])
    _part(out, 4, ["c"])
    (out / ".part-00005-00000000.parquet.tmp-123").write_bytes(b"half")  # a crash mid-write
    (out / "part-00006-0badc0de.parquet").write_bytes(b"PAR1 not really")  # never committed: redone
    _part(out, 7, ["d"])
    next(out.glob("part-00007-*.parquet")).unlink()  # a commit record whose part is gone: dropped
    _part(out, 8, ["e"])
    next(out.glob("part-00008-*.parquet")).write_bytes(b"PAR1 torn")  # committed size no longer matches
    st = scan_output(out, "m1", SCHEMA, force_model=False)
    assert st.done == {"a", "b", "c"} and st.next_part == 5
    assert sorted(n for n in os.listdir(out) if not n.startswith("_")) == sorted(
        p.name for p in out.glob("part-0000[04]-*.parquet"))
    assert parts_on_disk(out) == [0, 4]
    with pytest.raises(OutputConflict, match="--force-model"):
        scan_output(out, "m2", SCHEMA, force_model=False)
    st = scan_output(out, "m2", SCHEMA, force_model=True)
    assert st.done == set() and [n for n in os.listdir(out) if n != score.COMMITS] == []
    assert parts_on_disk(out) == []


def test_scan_output_refuses_duplicates_and_foreign_folders(tmp_path: Path) -> None:
    _part(tmp_path / "dup", 0, ["a", "b"])
    _part(tmp_path / "dup", 1, ["b"])
    with pytest.raises(OutputConflict, match="'b' has rows"):
        scan_output(tmp_path / "dup", "m1", SCHEMA, force_model=False)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "scan.png").write_bytes(b"x")
    with pytest.raises(OutputConflict, match="not a predictions folder"):
        scan_output(tmp_path / "foreign", "m1", SCHEMA, force_model=False)


def test_output_lock_is_exclusive(tmp_path: Path) -> None:
    lock = score.OutputLock(tmp_path)
    with pytest.raises(OutputConflict, match="another scoring run"):
        score.OutputLock(tmp_path)
    lock.release()
    score.OutputLock(tmp_path).release()


def test_plan_resources() -> None:
    cfg = ScoreConfig("a", "i", "o")
    assert plan_resources(cfg, 8, 0) == score.Resources(8, 1.0, 0.0, "actor")
    assert plan_resources(ScoreConfig("a", "i", "o", decode="task"), 8, 0).actors == 7  # a CPU for decoding
    # On GPUs nvJPEG decodes in the actors (decoder=auto); with Pillow a CPU task stage feeds them.
    assert plan_resources(cfg, 16, 2) == score.Resources(2, 1.0, 1.0, "actor")
    assert plan_resources(ScoreConfig("a", "i", "o", decoder="pil"), 16, 2) == score.Resources(2, 1.0, 1.0, "task")
    assert plan_resources(ScoreConfig("a", "i", "o", actors=3, cpus_per_actor=2), 8, 0).actors == 3


# --------------------------------------------------------------------------- Ray job end to end


@pytest.mark.ray
def test_scoring_matches_the_predictor_and_resumes(ray_session, capsys, artifact: Path, archive: Path,
                                                    tmp_path: Path) -> None:
    from cxrray.predict import Predictor, predict_paths

    out = tmp_path / "preds"
    # First a subset (a glob: ids stay relative to the archive root), then the whole archive.
    rc, s = run_main(capsys, "--artifact", str(artifact), "--input", str(archive / "*" / "img00*.png"), "--out",
                     str(out), "--actors", "1", "--chunk-size", "7")
    assert rc == 0 and s["images"] == 10
    rc, s = run_main(capsys, "--artifact", str(artifact), "--input", str(archive), "--out", str(out),
                     "--actors", "1", "--chunk-size", "16", "--decode", "task")
    assert rc == 0 and s["complete"] and s["already_done"] == 10 and s["scored_this_run"] == 50
    assert s["rows"] == 60 and s["resources"]["decode"] == "task"

    df = pd.read_parquet(out)
    p = Predictor(artifact, num_threads=1)
    assert list(df.columns) == ["image_id", "path", *p.prob_columns, "positive", "model_id", "error",
                                "study_uid", "series_uid", "sop_uid", "modality", "view_position", "body_part",
                                "photometric", "warnings"]
    assert df["image_id"].is_unique and len(df) == 60 and (df["model_id"] == p.model_id).all()
    ref = predict_paths(p, df["path"].tolist())
    for c in p.prob_columns:
        np.testing.assert_allclose(df[c].to_numpy(), ref[c], atol=1e-5)
    assert [list(x) for x in df["positive"]] == [list(x) for x in ref["positive"]]
    # Nothing left to do: a re-run scores nothing and changes nothing.
    rc, s = run_main(capsys, "--artifact", str(artifact), "--input", str(archive), "--out", str(out))
    assert rc == 0 and s["scored_this_run"] == 0 and s["rows"] == 60


@pytest.mark.ray
def test_decoding_in_tasks_stays_a_stage_apart_from_the_actors(ray_session, artifact: Path, archive: Path) -> None:
    """decode="task" with one-CPU actors: the two stages ask for the same resources, and Ray Data
    fuses such stages unless their remote args differ. Fused, the tasks would decode inside the
    actors (decode="actor" with extra copies)."""
    from cxrray.predict import Predictor
    from cxrray.score import Resources, build_dataset

    todo = list_inputs(str(archive)).head(8)
    cfg = ScoreConfig(str(artifact), str(archive), "unused", batch_size=4, decode="task")
    ds = build_dataset(todo, cfg, Resources(actors=1, cpus=1.0, gpus=0.0, decode="task"),
                       Predictor(artifact, num_threads=1).meta.preprocess)
    rows = sum(len(b) for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    stats = ds.stats()
    assert rows == 8
    assert "MapBatches(decode_batch)" in stats and "decode_batch)->" not in stats, stats


@pytest.mark.ray
def test_mixed_archive_gives_one_row_per_file_with_reasons(ray_session, capsys, artifact: Path,
                                                          tmp_path: Path) -> None:
    arc = tmp_path / "mixed"
    good = [write_png(arc / "png" / f"g{i}.png", seed=i) for i in range(5)]
    good.append(write_png(arc / "png" / "rgba.png", mode="RGBA"))
    good.append(write_png(arc / "jpg" / "g.jpg", mode="RGB"))
    (arc / "dcm").mkdir()
    dcm = dicom_bytes(np.random.default_rng(0).integers(0, 4095, (40, 36)))
    (arc / "dcm" / "ok.dcm").write_bytes(dcm)
    (arc / "dcm" / "1.2.840.99.1").write_bytes(dcm)  # extension-less, UID-named, as PACS exports do
    good += [arc / "dcm" / "ok.dcm", arc / "dcm" / "1.2.840.99.1"]
    whole = (arc / "png" / "g0.png").read_bytes()
    planted = {
        "bad/empty.png": (b"", "empty"),
        "bad/truncated.png": (whole[: len(whole) // 2], "truncated"),
        "bad/corrupt.png": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "corrupt"),
        "bad/notes.jpg": (b"patient list, not an image\n", "not_an_image"),
        "bad/README": (b"extension-less text\n", "not_an_image"),
        "bad/bomb.png": (png_declaring(100_000, 100_000), "too_large"),
        "bad/cut.dcm": (dcm[: len(dcm) - 500], "truncated"),
    }
    for rel, (data, _) in planted.items():
        (arc / rel).parent.mkdir(parents=True, exist_ok=True)
        (arc / rel).write_bytes(data)
    os.symlink(arc / "gone.png", arc / "bad" / "dangling.png")
    planted["bad/dangling.png"] = (b"", "missing")

    out = tmp_path / "out"
    rc, s = run_main(capsys, "--artifact", str(artifact), "--input", str(arc), "--out", str(out), "--actors", "1",
                     "--batch-size", "4")
    assert rc == 0 and s["complete"]
    df = pd.read_parquet(out).set_index("image_id")
    assert len(df) == len(good) + len(planted) == s["images"]
    for rel, (_, reason) in planted.items():
        assert df.loc[rel, "error"].split(":")[0] == reason, (rel, df.loc[rel, "error"])
        assert df.loc[rel, ["p_cardiomegaly", "p_pneumothorax"]].isna().all() and df.loc[rel, "positive"] is None
    ok = df.loc[[p.relative_to(arc).as_posix() for p in good]]
    assert ok["error"].isna().all() and ok["p_cardiomegaly"].between(0, 1).all()
    expected = pd.Series([r for _, r in planted.values()]).value_counts().to_dict()
    assert s["errors_by_reason"] == expected and s["errors"] == len(planted)
    # The pixel cap is an option: a small one turns the good images into too_large rows.
    rc, s = run_main(capsys, "--artifact", str(artifact), "--input", str(arc / "png"), "--out",
                     str(tmp_path / "capped"), "--actors", "1", "--max-pixels", "1000")
    assert s["errors_by_reason"] == {"too_large": 6}


@pytest.mark.ray
def test_another_models_output_is_refused_unless_forced(ray_session, capsys, artifact: Path,
                                                        other_artifact: Path, archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    inp = str(archive / "s1")
    assert run_main(capsys, "--artifact", str(artifact), "--input", inp, "--out", str(out), "--actors", "1")[0] == 0
    rc, s = run_main(capsys, "--artifact", str(other_artifact), "--input", inp, "--out", str(out))
    assert rc == 2 and "--force-model" in s["error"]
    rc, s = run_main(capsys, "--artifact", str(artifact), "--input", str(archive / "s2"), "--out", str(out))
    assert rc == 2 and "input changed" in s["error"]
    rc, s = run_main(capsys, "--artifact", str(other_artifact), "--input", inp, "--out", str(out), "--actors", "1",
                     "--force-model")
    assert rc == 0 and s["scored_this_run"] == 15
    df = pd.read_parquet(out)
    assert len(df) == 15 and df["model_id"].nunique() == 1 and df["model_id"].iloc[0] == s["model_id"]
    doc = json.loads((out / "_manifest.json").read_text())
    assert doc["model_id"] == s["model_id"] and doc["complete"] and len(doc["runs"]) == 1


@pytest.mark.ray
def test_unscorable_files_become_error_rows_and_the_job_goes_on(ray_session, capsys, artifact: Path,
                                                                 tmp_path: Path) -> None:
    """A Latin-1 name stopped the whole job (Arrow holds only UTF-8) and a named pipe hung it; a
    refused run left a _lock in the folder it refused; --out inside --input scored its own files."""
    inp = tmp_path / "in"
    for i in range(3):
        write_png(inp / f"ok{i}.png", seed=i)
    write_png(inp / os.fsdecode(b"caf\xe9.png"), seed=7)
    os.mkfifo(inp / "pipe.png")
    out = inp / "preds"
    for run in (1, 2):  # the second run finds everything done, and its own output is not input
        rc, s = run_main(capsys, "--artifact", str(artifact), "--input", str(inp), "--out", str(out), "--actors", "1")
        assert rc == 0 and s["images"] == 5 and s["complete"], s
        assert s["errors_by_reason"] == {"bad_name": 1, "not_a_file": 1}, s
    df = pd.read_parquet(out).set_index("image_id")
    first_prob = next(c for c in df.columns if c.startswith("p_"))
    assert pd.isna(df.loc["ok0.png", "error"]) and df[first_prob].notna().sum() == 3  # the good ones scored
    assert df.loc["caf\\xe9.png", "error"].startswith("bad_name: ") and "rename it" in df.loc["caf\\xe9.png", "error"]
    assert df.loc["pipe.png", "error"].startswith("not_a_file: ") and "named pipe" in df.loc["pipe.png", "error"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    rc, s = run_main(capsys, "--artifact", str(artifact), "--input", str(inp), "--out", str(foreign))
    assert rc == 2 and "not a predictions folder" in s["error"]
    assert sorted(os.listdir(foreign)) == ["notes.txt"]  # refused: nothing written there, no _lock
    rc, s = run_main(capsys, "--artifact", str(artifact), "--input", str(inp), "--out", str(foreign / "notes.txt"))
    assert rc == 2 and "is a file" in s["error"]
    rc, s = run_main(capsys, "--artifact", str(artifact), "--input", str(inp), "--out", str(tmp_path / "o2"),
                     "--cpus-per-actor", "64")
    assert rc == 2 and "no autoscaler" in s["error"], s  # not a wait for ever on CPUs that never come


@pytest.mark.ray
@pytest.mark.slow
def test_auroc_from_the_parquet_equals_evaluate(ray_session, capsys, tmp_path: Path) -> None:
    from quick_train import quick_train
    from cxrray.evaluate import evaluate
    from cxrray.labels import SYNTHETIC_FINDINGS
    from cxrray.manifest import write_manifest
    from cxrray.metrics import compute_metrics
    from cxrray.sources import load_chexpert
    from cxrray.sources.synthetic import SynthConfig, write_synthetic_chexpert
    from cxrray.splits import assign_splits

    write_synthetic_chexpert(tmp_path / "syn", SynthConfig(n_patients=40, size=64, seed=3))
    res = load_chexpert(tmp_path / "syn", labels=list(SYNTHETIC_FINDINGS))
    df = assign_splits(res.manifest, res.label_space, (0.5, 0.2, 0.3), seed=0)
    space = res.label_space
    art = quick_train(df, space, tmp_path / "art", epochs=2)
    manifest = write_manifest(df, space, tmp_path / "m.parquet")
    test = df[df["split"] == "test"]
    write_manifest(test, space, tmp_path / "test.parquet")

    rc, s = run_main(capsys, "--artifact", str(art), "--input", str(tmp_path / "test.parquet"), "--out",
                     str(tmp_path / "preds"), "--actors", "1")
    assert rc == 0 and s["images"] == len(test) and s["errors"] == 0
    preds = pd.read_parquet(tmp_path / "preds").set_index("image_id").loc[test["image_id"]]
    probs = preds[[c for c in preds.columns if c.startswith("p_")]].to_numpy(np.float64)
    # evaluate scores certain labels by default: the raw -1 (uncertain) and blank cells masked.
    cells = test[list(space.columns)].to_numpy(np.float32)
    assert (cells == -1).any()
    targets = np.where(cells == -1, np.nan, cells)
    ours = compute_metrics(space, targets, probs).auroc_by_class()
    ev = evaluate(art, manifest, tmp_path / "eval", split="test", bootstrap=0)
    theirs = ev.metrics.auroc_by_class()
    assert ours.keys() == theirs.keys() and any(v is not None for v in ours.values())
    for k in ours:
        assert (ours[k] is None) == (theirs[k] is None)
        if ours[k] is not None:
            assert ours[k] == pytest.approx(theirs[k], abs=1e-6)
    # evaluate scored through the same pipeline: its own predictions are the scoring job's rows.
    assert ev.scoring["scored_this_run"] == len(test) and ev.n_errors == 0
    own = pd.read_parquet(tmp_path / "eval" / "predictions").set_index("image_id").loc[test["image_id"]]
    p_cols = [c for c in preds.columns if c.startswith("p_")]
    np.testing.assert_allclose(own[p_cols].to_numpy(np.float64), probs, atol=1e-6)
    # Pointed at the scoring job's output, evaluate reuses it (scores nothing) and agrees again.
    reused = evaluate(art, manifest, tmp_path / "eval2", split="test", bootstrap=0, gallery_k=0,
                      predictions=tmp_path / "preds")
    assert reused.scoring["scored_this_run"] == 0 and reused.scoring["already_done"] == len(test)
    again = reused.metrics.auroc_by_class()
    assert all(again[k] == ours[k] if ours[k] is None else again[k] == pytest.approx(ours[k], abs=1e-6) for k in ours)
    assert not (tmp_path / "eval2" / "predictions").exists()


# --------------------------------------------------------------------------- crash and resume


def _alive_actor_pids(class_part: str) -> list[int]:
    from ray._private import state

    return [a["Pid"] for a in state.actors().values() if a["State"] == "ALIVE" and class_part in a["ActorClassName"]]


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, str(REPO / "jobs" / "score.py"), *argv], cwd=REPO, env=env,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_part(out: Path, proc: subprocess.Popen, timeout: float = 300, pattern: str = "part-*.parquet") -> None:
    end = time.time() + timeout  # a liveness guard, not a speed bar (a loaded machine took > 120 s)
    while not list(out.glob(pattern)):
        assert proc.poll() is None, "the scoring run ended before writing a part"
        assert time.time() < end, "no part file appeared"
        time.sleep(0.02)


@pytest.mark.ray
@pytest.mark.slow
def test_sigkill_of_the_driver_or_a_worker_then_rerun_gives_one_row_per_image(ray_session, artifact: Path,
                                                                             tmp_path: Path) -> None:
    arc = tmp_path / "arc"
    for i in range(300):
        write_png(arc / f"d{i % 10}" / f"{i:04d}.png", size=32, seed=i)
    out = tmp_path / "out"
    address = ray_session.get_runtime_context().gcs_address
    argv = ["--artifact", str(artifact), "--input", str(arc), "--out", str(out), "--actors", "1",
            "--batch-size", "4", "--chunk-size", "10", "--ray-address", address, "--json"]

    # 1. SIGKILL a Predictor actor mid-run: Ray Data restarts it and the run still completes.
    proc = _start(argv, tmp_path / "run1.log")
    try:
        _wait_for_part(out, proc)
        pids = _alive_actor_pids("ContractPredictor")
        assert pids, "no Predictor actor to kill"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=300) == 0, (tmp_path / "run1.log").read_text()[-3000:]
    finally:
        proc.kill()
    s = json.loads((tmp_path / "run1.log").read_text().strip().splitlines()[-1])
    assert s["complete"] and s["rows"] == 300

    # 2. SIGKILL the driver after its first part; the same command then completes the rest.
    out2 = tmp_path / "out2"
    argv[argv.index(str(out))] = str(out2)
    proc = _start(argv, tmp_path / "run2.log")
    try:
        # After a commit record: a part file alone may be caught before its record (CI saw the
        # kill land in that gap on a loaded machine), and an uncommitted part is not a row.
        _wait_for_part(out2, proc, pattern="_commits/part-*.json")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    left = read_predictions(str(out2))  # committed rows only: what a resume may trust
    assert 0 < len(left) < 300, "the kill came too late to test resuming"
    proc = _start(argv, tmp_path / "run3.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "run3.log").read_text()[-3000:]
    s = json.loads((tmp_path / "run3.log").read_text().strip().splitlines()[-1])
    assert s["already_done"] == len(left) and s["scored_this_run"] == 300 - len(left)
    df = pd.read_parquet(out2)
    assert len(df) == 300 and df["image_id"].is_unique and df["error"].isna().all()
    assert set(df["image_id"]) == set(list_inputs(str(arc))["image_id"])


# --------------------------------------------------------------------------- real data


@pytest.mark.ray
@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("folder, n", [("nih14/images", 200), ("kermany/chest_xray/test", 624)])
def test_real_archives_score_without_errors(ray_session, capsys, shared_data: Path, artifact: Path,
                                            tmp_path: Path, folder: str, n: int) -> None:
    rc, s = run_main(capsys, "--artifact", str(artifact), "--input", str(shared_data / folder), "--out",
                     str(tmp_path / "out"), "--actors", "2", "--batch-size", "32")
    assert rc == 0 and s["images"] == n and s["rows"] == n and s["errors"] == 0, s
    df = pd.read_parquet(tmp_path / "out")
    assert df["image_id"].is_unique and df["p_cardiomegaly"].notna().all()
