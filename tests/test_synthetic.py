"""The synthetic generator: CheXpert layout, determinism, label statistics, and findings in known places."""
from __future__ import annotations

import csv
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrray.labels import CHEXPERT_14, SYNTHETIC_FINDINGS
from cxrray.sources.synthetic import (
    CSV_HEADER,
    ROOT_NAME,
    SynthConfig,
    read_truth,
    render_study,
    render_study_truth,
    write_synthetic_chexpert,
)

REAL_HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
    "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,"
    "Fracture,Support Devices"
)
PATH_RE = re.compile(rf"^{ROOT_NAME}/(train|valid)/patient(\d{{5}})/study(\d+)/view(\d)_(frontal|lateral)\.jpg$")
SIZE = 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = write_synthetic_chexpert(out, SynthConfig(n_patients=160, size=SIZE, seed=7))
    return out, summary


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_layout_and_header_are_chexperts(dataset):
    out, s = dataset
    assert s.root == out / ROOT_NAME
    for p in (s.train_csv, s.valid_csv):
        assert p.read_text().splitlines()[0] == REAL_HEADER
    assert ",".join(CSV_HEADER) == REAL_HEADER
    assert s.boxes_csv.read_text().splitlines()[0] == "Path,Finding,x,y,w,h"
    for split, csv_path in (("train", s.train_csv), ("valid", s.valid_csv)):
        for row in read_rows(csv_path):
            m = PATH_RE.match(row["Path"])
            assert m and m.group(1) == split, row["Path"]
            frontal = m.group(5) == "frontal"
            assert row["Frontal/Lateral"] == ("Frontal" if frontal else "Lateral")
            assert row["AP/PA"] in (("AP", "PA") if frontal else ("",))
            assert row["Sex"] in ("Male", "Female") and 18 <= int(row["Age"]) <= 90
            assert (out / row["Path"]).is_file()
    with Image.open(out / read_rows(s.valid_csv)[0]["Path"]) as im:
        assert im.format == "JPEG" and im.mode == "L" and im.size == (SIZE, SIZE)
    assert all(int(PATH_RE.match(r["Path"]).group(2)) >= 64541 for r in read_rows(s.valid_csv))


def test_values_like_the_real_files(dataset):
    _, s = dataset
    train, valid = read_rows(s.train_csv), read_rows(s.valid_csv)
    train_values = {r[c] for r in train for c in CHEXPERT_14}
    assert train_values == {"1.0", "0.0", "-1.0", ""}
    assert {r[c] for r in valid for c in CHEXPERT_14} == {"1.0", "0.0"}
    for name in SYNTHETIC_FINDINGS:
        col = [r[name] for r in train]
        assert 0 < col.count("-1.0") / len(col) < 0.12, name
        assert "" in col, name
    pathology = [c for c in CHEXPERT_14 if c not in ("No Finding", "Support Devices")]
    for r in train:
        sick = any(r[c] in ("1.0", "-1.0") for c in pathology)
        assert r["No Finding"] == ("" if sick else "1.0")


def test_prevalence_is_imbalanced_like_real_data(dataset):
    _, s = dataset
    p = s.prevalence
    assert 0.35 < p["Support Devices"] < 0.65
    assert 0.25 < p["Pleural Effusion"] < 0.55
    for name in ("Cardiomegaly", "Lung Lesion", "Consolidation", "Pneumothorax"):
        assert 0.03 < p[name] < 0.2, (name, p[name])


def test_patients_have_studies_and_laterals(dataset):
    _, s = dataset
    studies: dict[str, set[int]] = defaultdict(set)
    views = defaultdict(int)
    for csv_path in (s.train_csv, s.valid_csv):
        for r in read_rows(csv_path):
            m = PATH_RE.match(r["Path"])
            studies[m.group(2)].add(int(m.group(3)))
            views[m.group(5)] += 1
    assert len(studies) == s.n_patients
    assert all(nums == set(range(1, len(nums) + 1)) for nums in studies.values())
    assert any(len(nums) > 1 for nums in studies.values())
    assert views["lateral"] > 0 and views["frontal"] + views["lateral"] == s.n_images


def test_boxes_for_positive_frontal_findings_inside_the_image(dataset):
    _, s = dataset
    boxes = defaultdict(set)
    for b in read_rows(s.boxes_csv):
        x, y, w, h = (int(b[k]) for k in "xywh")
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= SIZE and y + h <= SIZE, b
        boxes[b["Path"]].add(b["Finding"])
    for r in read_rows(s.train_csv) + read_rows(s.valid_csv):
        positive = {n for n in SYNTHETIC_FINDINGS if r[n] == "1.0"}
        expected = positive if r["Frontal/Lateral"] == "Frontal" else set()
        assert boxes.get(r["Path"], set()) == expected, r["Path"]


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    cfg = SynthConfig(n_patients=12, size=48, seed=3)
    a = write_synthetic_chexpert(tmp_path / "a", cfg)
    b = write_synthetic_chexpert(tmp_path / "b", cfg)
    c = write_synthetic_chexpert(tmp_path / "c", SynthConfig(n_patients=12, size=48, seed=4))
    for name in ("train.csv", "valid.csv", "boxes.csv"):
        assert (a.root / name).read_bytes() == (b.root / name).read_bytes()
    assert (a.root / "train.csv").read_bytes() != (c.root / "train.csv").read_bytes()
    first = read_rows(a.train_csv)[0]["Path"]
    pix = [np.asarray(Image.open(tmp_path / d / first)) for d in "abc"]
    assert np.array_equal(pix[0], pix[1]) and not np.array_equal(pix[0], pix[2])


@pytest.mark.parametrize("finding", SYNTHETIC_FINDINGS)
def test_finding_changes_the_image_inside_its_box(finding):
    for seed in range(4):
        healthy, none = render_study(np.random.default_rng(seed), {}, 128)
        sick, boxes = render_study(np.random.default_rng(seed), {finding: 1.0}, 128)
        assert none == [] and boxes and {b[0] for b in boxes} == {finding}
        diff = np.abs(sick.astype(np.float64) - healthy)
        inside = np.zeros(diff.shape, bool)
        for _, x, y, w, h in boxes:
            inside[y : y + h, x : x + w] = True
        assert inside.mean() < 0.35, "a box covering most of the image proves nothing"
        assert diff[inside].mean() > 5, "the finding barely changes its box"
        assert diff[inside].sum() / diff.sum() >= 0.7


def test_rng_is_consumed_the_same_whatever_the_findings():
    a, b = np.random.default_rng(1), np.random.default_rng(1)
    render_study(a, {}, 64)
    render_study(b, {n: 1.0 for n in SYNTHETIC_FINDINGS}, 64, view="frontal")
    assert a.random() == b.random()


def test_uncertain_is_drawn_faintly_or_not_at_all_and_never_boxed():
    drawn = []
    for seed in range(12):
        healthy, _ = render_study(np.random.default_rng(seed), {}, 64)
        unsure, boxes = render_study(np.random.default_rng(seed), {"Pleural Effusion": -1.0}, 64)
        assert boxes == []
        drawn.append(not np.array_equal(unsure, healthy))
    assert any(drawn) and not all(drawn)


def test_truth_csv_says_what_each_picture_holds(dataset):
    """truth.csv: per image and finding, present (label 1), absent (0 or blank), and for an
    uncertain label faint or absent, about half each; the picture agrees with it."""
    out, summary = dataset
    truth = read_truth(summary.truth_csv)
    rows = read_rows(summary.train_csv) + read_rows(summary.valid_csv)
    assert sorted(truth.index) == sorted(r["Path"] for r in rows)
    uncertain = []
    for r in rows:
        for name in SYNTHETIC_FINDINGS:
            state = truth.at[r["Path"], name]
            if r[name] == "1.0":
                assert state == "present", (r["Path"], name)
            elif r[name] == "-1.0":
                assert state in ("faint", "absent")
                uncertain.append(state == "faint")
            else:
                assert state == "absent", (r["Path"], name, r[name])
    assert len(uncertain) > 50 and 0.3 < np.mean(uncertain) < 0.7, (len(uncertain), np.mean(uncertain))
    for seed in range(8):  # "faint" is drawn, "absent" is not: the truth is the picture's
        healthy, _ = render_study(np.random.default_rng(seed), {}, 64)
        unsure, _, drawn = render_study_truth(np.random.default_rng(seed), {"Pleural Effusion": -1.0}, 64)
        assert (drawn["Pleural Effusion"] == "faint") == (not np.array_equal(unsure, healthy)), seed
    bad = out / "bad_truth.csv"
    bad.write_text("Path,Cardiomegaly\na.jpg,maybe\n")
    with pytest.raises(ValueError, match="not a synthetic truth.csv"):
        read_truth(bad)


def test_lateral_view_and_bad_arguments():
    img, _ = render_study(np.random.default_rng(0), {"Cardiomegaly": 1.0}, 96, view="lateral")
    assert img.shape == (96, 96) and img.dtype == np.uint8 and 20 < img.mean() < 235
    with pytest.raises(ValueError, match="view"):
        render_study(np.random.default_rng(0), {}, 64, view="oblique")
    with pytest.raises(ValueError, match="unknown findings"):
        render_study(np.random.default_rng(0), {"Edema": 1.0}, 64)
    with pytest.raises(ValueError):
        SynthConfig(size=8)
