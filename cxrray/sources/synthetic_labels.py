"""The synthetic label model: patients, their studies, and the labels a report labeler writes.

Findings follow patients (a carrier shows a finding in most of their studies), train studies
carry uncertain labels (-1) at each finding's own rate, negatives are mostly left blank, the
columns the generator does not draw are derived from the ones it does, and validation studies
get the radiologist-consensus style (every column 0 or 1), as in the real CheXpert. Which view
a study has and its demographics are drawn here too, from the same per-patient rng, so a
plan depends only on the seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cxrray.labels import CHEXPERT_14, SYNTHETIC_FINDINGS

if TYPE_CHECKING:  # the writer's config; imported for annotations only (synthetic imports this module)
    from cxrray.sources.synthetic import SynthConfig

VALID_FIRST_ID = 64541  # the real CheXpert validation patients start here


@dataclass(frozen=True)
class _Rate:
    prevalence: float  # target share of train images labelled positive
    persist: float  # P(present in a study | the patient carries it): findings follow patients
    uncertain: float  # P(labelled -1) per train study
    explicit_negative: float  # P(a negative is written 0.0 rather than left blank)

    def carrier(self) -> float:
        return min(1.0, 0.8 * self.prevalence / self.persist)

    def background(self) -> float:
        q = self.carrier()
        return max(0.0, (self.prevalence - q * self.persist) / max(1e-9, 1.0 - q))


# Rare findings nudged up to ~10% so small test sets still hold positives.
RATES: dict[str, _Rate] = {
    "Cardiomegaly": _Rate(0.12, 0.9, 0.04, 0.15),
    "Lung Lesion": _Rate(0.1, 0.9, 0.03, 0.05),
    "Consolidation": _Rate(0.1, 0.55, 0.06, 0.15),
    "Pneumothorax": _Rate(0.09, 0.55, 0.04, 0.35),
    "Pleural Effusion": _Rate(0.38, 0.75, 0.06, 0.25),
    "Support Devices": _Rate(0.5, 0.85, 0.03, 0.05),
}
_PATHOLOGY = tuple(n for n in CHEXPERT_14 if n not in ("No Finding", "Support Devices"))


@dataclass(frozen=True)
class Study:
    """One study of one patient: its CSV columns, and what the renderer draws for it."""

    split: str
    patient: str
    patient_index: int
    study: int
    sex: str
    age: int
    ap_pa: str
    lateral: bool
    labels: dict[str, float | None]  # all 14 columns; None = blank

    def render_findings(self) -> dict[str, float]:
        # A blank column is a finding the report never mentions: absent from the picture.
        return {n: (self.labels[n] if self.labels[n] is not None else 0.0) for n in SYNTHETIC_FINDINGS}


def _state(rng: np.random.Generator, rate: _Rate, carrier: bool, train: bool) -> float:
    unc, pos = rng.random(), rng.random()
    if train and unc < rate.uncertain:
        return -1.0
    return 1.0 if pos < (rate.persist if carrier else rate.background()) else 0.0


def _pick(rng: np.random.Generator, options: list[tuple[float, float]]) -> float | None:
    """Return the value of the first (probability, value) that fires, else blank."""
    x = rng.random()
    for p, value in options:
        if x < p:
            return value
        x -= p
    return None


def _derived(rng: np.random.Generator, s: dict[str, float]) -> dict[str, float | None]:
    """Columns the generator does not draw, labelled the way a report labeler would:
    from the drawn findings they go with, else blank. Edema, Pleural Other, Fracture: blank."""
    heart, consol = s["Cardiomegaly"], s["Consolidation"]
    if heart == 1.0:
        mediastinum = [(0.35, 1.0), (0.15, -1.0)]
    else:
        mediastinum = [(0.3, -1.0)] if heart == -1.0 else [(0.03, 0.0)]
    if consol != 0.0:
        opacity = [(0.85, 1.0)] if consol == 1.0 else [(0.5, -1.0)]
    elif s["Lung Lesion"] == 1.0 or s["Pleural Effusion"] == 1.0:
        opacity = [(0.3, 1.0)] if s["Lung Lesion"] == 1.0 else [(0.15, 1.0)]
    else:
        opacity = []
    out: dict[str, float | None] = dict.fromkeys(CHEXPERT_14)
    out["Enlarged Cardiomediastinum"] = _pick(rng, mediastinum)
    out["Lung Opacity"] = _pick(rng, opacity)
    out["Pneumonia"] = _pick(rng, [(0.25, 1.0), (0.35, -1.0)] if consol == 1.0 else [])
    # Compressive atelectasis next to an effusion.
    out["Atelectasis"] = _pick(rng, [(0.08, 1.0), (0.08, -1.0)] if s["Pleural Effusion"] == 1.0 else [])
    return out


def _labels(rng: np.random.Generator, states: dict[str, float], train: bool) -> dict[str, float | None]:
    out = _derived(rng, states)
    for name, value in states.items():
        explicit = rng.random() < RATES[name].explicit_negative
        out[name] = value if value != 0.0 or explicit else None
    sick = any(out[n] in (1.0, -1.0) for n in _PATHOLOGY)
    out["No Finding"] = None if sick else 1.0
    if not train:  # radiologist consensus: every column 0 or 1
        out = {n: 1.0 if v == 1.0 else 0.0 for n, v in out.items()}
    return out


def _plan_patient(config: SynthConfig, index: int, split: str, patient: str) -> list[Study]:
    rng = np.random.default_rng([config.seed, index, 0])
    train = split == "train"
    sex = "Male" if rng.random() < 0.58 else "Female"
    age = int(np.clip(round(rng.normal(61.0, 17.0)), 18, 90))
    carrier = {n: bool(rng.random() < RATES[n].carrier()) for n in SYNTHETIC_FINDINGS}
    weights = 1.0 / np.arange(1, config.max_studies + 1) ** 1.2
    n_studies = 1 + int(rng.choice(config.max_studies, p=weights / weights.sum())) if train else 1
    studies = []
    for k in range(1, n_studies + 1):
        states = {n: _state(rng, RATES[n], carrier[n], train) for n in SYNTHETIC_FINDINGS}
        labels = _labels(rng, states, train)
        ap = "AP" if rng.random() < (0.85 if states["Support Devices"] == 1.0 else 0.55) else "PA"
        lateral = bool(rng.random() < config.lateral_fraction)
        studies.append(Study(split, patient, index, k, sex, min(90, age + (k - 1) // 2), ap, lateral, labels))
    return studies


def plan_studies(config: SynthConfig) -> list[Study]:
    """Every study the generator writes for `config` (patients, labels, views), in write order."""
    n_valid = min(config.n_patients - 1, round(config.n_patients * config.valid_fraction))
    n_train = config.n_patients - n_valid
    first_valid = max(VALID_FIRST_ID, n_train + 1)
    studies: list[Study] = []
    for i in range(config.n_patients):
        split, number = ("train", i + 1) if i < n_train else ("valid", first_valid + i - n_train)
        studies += _plan_patient(config, i, split, f"patient{number:05d}")
    return studies
