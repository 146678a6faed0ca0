"""Synthetic chest X-rays written in CheXpert-v1.0-small layout: the built-in dataset.

A model that learns it shows the pipeline works; a model that cannot learn it shows a bug.
Every code path that reads CheXpert reads it unchanged:

    OUT/CheXpert-v1.0-small/train.csv, valid.csv      (the real header and value style)
    OUT/CheXpert-v1.0-small/{train,valid}/patientNNNNN/studyK/view1_frontal.jpg (+ view2_lateral.jpg)
    OUT/CheXpert-v1.0-small/boxes.csv                  (Path,Finding,x,y,w,h; frontal positives)
    OUT/CheXpert-v1.0-small/truth.csv                  (Path + per finding: present / faint / absent)

This module is the writer. What it writes comes from three others: the label model
(`synthetic_labels`: patients, studies, labels), the phantom (`synthetic_phantom`: a normal
chest, posed, in a patient coordinate frame) with its findings (`synthetic_findings`: each
changes the picture in one known place; its box is the bounding box of that change), and the
renderer (`synthetic_render`: findings at their labelled strength, exposure, noise). Uncertain
labels (-1) are drawn faintly or not at all, so they are genuinely ambiguous; truth.csv says
which, so a model can be scored against what is in the picture. Same seed, same bytes.
"""
from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cxrray.labels import CHEXPERT_14, SYNTHETIC_FINDINGS
from cxrray.sources.synthetic_labels import RATES, Study, plan_studies
from cxrray.sources.synthetic_render import FRONTAL, LATERAL, Box, render_study, render_study_truth, render_study_unit

# The generator's public surface, imported from here by the CLI, the DICOM writer and tests;
# the label model and the renderer live in their own modules.
__all__ = [
    "BOX_HEADER", "CSV_HEADER", "FRONTAL", "LATERAL", "RATES", "ROOT_NAME", "TRUTH_HEADER", "TRUTH_STATES", "Box",
    "Study", "SynthConfig", "SynthSummary", "image_rng", "plan_studies", "read_truth", "render_study",
    "render_study_truth", "render_study_unit", "study_images", "write_synthetic_chexpert",
]

log = logging.getLogger(__name__)

ROOT_NAME = "CheXpert-v1.0-small"
CSV_HEADER: tuple[str, ...] = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_14)
BOX_HEADER: tuple[str, ...] = ("Path", "Finding", "x", "y", "w", "h")
TRUTH_HEADER: tuple[str, ...] = ("Path", *SYNTHETIC_FINDINGS)
TRUTH_STATES: tuple[str, ...] = ("present", "faint", "absent")


@dataclass(frozen=True)
class SynthConfig:
    n_patients: int = 300
    size: int = 128
    seed: int = 0
    valid_fraction: float = 0.1
    lateral_fraction: float = 0.25  # fraction of studies that also get a lateral
    max_studies: int = 3
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if self.n_patients < 1 or self.max_studies < 1:
            raise ValueError(f"n_patients and max_studies must be >= 1, got {self.n_patients}, {self.max_studies}")
        if self.size < 32:
            raise ValueError(f"size must be >= 32 px (findings vanish below that), got {self.size}")
        if not (0.0 <= self.valid_fraction < 1.0 and 0.0 <= self.lateral_fraction <= 1.0):
            raise ValueError("valid_fraction must be in [0, 1) and lateral_fraction in [0, 1]")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")


@dataclass
class SynthSummary:
    root: Path
    n_images: int
    n_patients: int
    train_csv: Path
    valid_csv: Path
    boxes_csv: Path
    truth_csv: Path
    prevalence: dict[str, float]
    seconds: float


def image_rng(config: SynthConfig, st: Study, view_no: int) -> np.random.Generator:
    """The rng that renders view `view_no` (1-based) of study `st`: one picture, whatever the writer."""
    return np.random.default_rng([config.seed, st.patient_index, st.study, view_no])


def study_images(st: Study) -> list[tuple[int, str, str]]:
    """(view number, FRONTAL/LATERAL, CheXpert path of its JPEG) for each image of the study."""
    views = [FRONTAL, LATERAL] if st.lateral else [FRONTAL]
    return [(n, view, f"{ROOT_NAME}/{st.split}/{st.patient}/study{st.study}/view{n}_{view}.jpg")
            for n, view in enumerate(views, start=1)]


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _csv_row(rel: str, st: Study, view: str) -> list[str]:
    frontal = view == FRONTAL
    head = [rel, st.sex, str(st.age), "Frontal" if frontal else "Lateral", st.ap_pa if frontal else ""]
    return head + [_fmt(st.labels[n]) for n in CHEXPERT_14]


def _write_csv(path: Path, header: tuple[str, ...], rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def write_synthetic_chexpert(
    out: str | Path, config: SynthConfig = SynthConfig(), progress: bool = False
) -> SynthSummary:
    """Generate the dataset under OUT/CheXpert-v1.0-small and return where everything is.

    Existing files are overwritten; stray images from an earlier, larger run stay on disk
    but are not listed in the CSVs, which define the dataset.
    """
    t0 = time.perf_counter()
    out = Path(out)
    root = out / ROOT_NAME
    root.mkdir(parents=True, exist_ok=True)
    studies = plan_studies(config)
    rows: dict[str, list[list[str]]] = {"train": [], "valid": []}
    boxes: list[list[str]] = []
    truth: list[list[str]] = []
    bar = _progress(len(studies), progress)
    for st in studies:
        for view_no, view, rel in study_images(st):
            img, bxs, drawn = render_study_truth(image_rng(config, st, view_no), st.render_findings(), config.size,
                                                 view)
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(out / rel, quality=config.jpeg_quality)
            rows[st.split].append(_csv_row(rel, st, view))
            truth.append([rel, *(drawn[n] for n in SYNTHETIC_FINDINGS)])
            if view == FRONTAL:
                boxes += [[rel, name, str(x), str(y), str(w), str(h)] for name, x, y, w, h in bxs]
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    paths = {name: root / f"{name}.csv" for name in ("train", "valid", "boxes", "truth")}
    _write_csv(paths["train"], CSV_HEADER, rows["train"])
    _write_csv(paths["valid"], CSV_HEADER, rows["valid"])
    _write_csv(paths["boxes"], BOX_HEADER, boxes)
    _write_csv(paths["truth"], TRUTH_HEADER, truth)
    all_rows = rows["train"] + rows["valid"]
    cols = {n: CSV_HEADER.index(n) for n in SYNTHETIC_FINDINGS}
    prevalence = {n: sum(r[c] == "1.0" for r in all_rows) / max(1, len(all_rows)) for n, c in cols.items()}
    seconds = time.perf_counter() - t0
    log.info("synthetic CheXpert: %d images of %d patients in %.1fs -> %s",
             len(all_rows), config.n_patients, seconds, root)
    return SynthSummary(root, len(all_rows), config.n_patients, paths["train"], paths["valid"], paths["boxes"],
                        paths["truth"], prevalence, seconds)


def read_truth(truth_csv: str | Path) -> "pd.DataFrame":
    """truth.csv as a frame indexed by Path (the manifest's image_id), one column per finding
    holding present / faint / absent."""
    import io

    import pandas as pd

    from cxrray import storage

    frame = pd.read_csv(io.BytesIO(storage.read_bytes(str(truth_csv))), dtype=str).set_index("Path")
    bad = sorted(set(frame.to_numpy().ravel()) - set(TRUTH_STATES))
    if list(frame.columns) != list(SYNTHETIC_FINDINGS) or bad:
        raise ValueError(f"{truth_csv}: not a synthetic truth.csv (columns {list(frame.columns)}, values {bad[:3]})")
    return frame


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="study", desc="synthetic CXR")
