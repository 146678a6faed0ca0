"""Label spaces and CheXpert uncertainty policies. Pure: no Ray, no torch.

A label space is an ordered tuple of class names plus a task kind. It travels with every
manifest, artifact and prediction file, so the column order can never silently change.

Manifest label values are float32 per class; NaN means "no supervision" (masked in loss
and metrics). Under U-MultiClass each label keeps three states, encoded 0 (negative),
1 (positive), 2 (uncertain), and the model predicts a 3-way softmax per label.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterable, Mapping, Sequence

import numpy as np

MULTILABEL = "multilabel"
MULTICLASS = "multiclass"

CHEXPERT_14: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
# The five observations of the CheXpert competition (Irvin et al. 2019).
CHEXPERT_5: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")

NIH_14: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
KERMANY_2: tuple[str, ...] = ("NORMAL", "PNEUMONIA")
KERMANY_3: tuple[str, ...] = ("NORMAL", "BACTERIAL", "VIRAL")

# The findings the synthetic generator draws into the image; the demo trains on these.
SYNTHETIC_FINDINGS: tuple[str, ...] = (
    "Cardiomegaly",
    "Lung Lesion",
    "Consolidation",
    "Pneumothorax",
    "Pleural Effusion",
    "Support Devices",
)


@dataclass(frozen=True)
class LabelSpace:
    """Ordered class names and the task kind.

    `uncertain_classes` is True only for CheXpert U-MultiClass, where each name is a
    3-state label (negative / positive / uncertain) rather than a binary one.
    """

    names: tuple[str, ...]
    task: str = MULTILABEL
    uncertain_classes: bool = False

    def __post_init__(self) -> None:
        if self.task not in (MULTILABEL, MULTICLASS):
            raise ValueError(f"task must be {MULTILABEL!r} or {MULTICLASS!r}, got {self.task!r}")
        # An empty label space is allowed: an unlabelled folder manifest, used for scoring.
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"label names must be unique: {self.names}")
        if self.uncertain_classes and self.task != MULTILABEL:
            raise ValueError("uncertain_classes (U-MultiClass) only applies to multi-label tasks")
        object.__setattr__(self, "names", tuple(self.names))

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def num_outputs(self) -> int:
        """Logits the model emits: 3 per label under U-MultiClass."""
        return len(self.names) * (3 if self.uncertain_classes else 1)

    @property
    def columns(self) -> tuple[str, ...]:
        """Manifest column names (the class names themselves)."""
        return self.names

    @property
    def prob_columns(self) -> tuple[str, ...]:
        return tuple(prob_column(n) for n in self.names)

    def to_dict(self) -> dict:
        return {"names": list(self.names), "task": self.task, "uncertain_classes": self.uncertain_classes}

    @classmethod
    def from_dict(cls, d: Mapping) -> "LabelSpace":
        return cls(tuple(d["names"]), d.get("task", MULTILABEL), bool(d.get("uncertain_classes", False)))

    def select(self, names: Sequence[str]) -> "LabelSpace":
        missing = [n for n in names if n not in self.names]
        if missing:
            raise ValueError(f"unknown classes {missing}; this label space has {list(self.names)}")
        return LabelSpace(tuple(names), self.task, self.uncertain_classes)


def sanitize(name: str) -> str:
    """A column-safe form of a class name: 'Pleural Effusion' -> 'pleural_effusion'."""
    return re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower()


def prob_column(name: str) -> str:
    return f"p_{sanitize(name)}"


class Policy(str, Enum):
    """CheXpert uncertainty policies (Irvin et al. 2019, section 3)."""

    IGNORE = "U-Ignore"  # uncertain -> NaN (no supervision)
    ZEROS = "U-Zeros"  # uncertain -> 0
    ONES = "U-Ones"  # uncertain -> 1
    MULTICLASS = "U-MultiClass"  # uncertain kept as its own state (2)

    @classmethod
    def parse(cls, value: "str | Policy") -> "Policy":
        if isinstance(value, Policy):
            return value
        key = value.strip().lower().replace("_", "-")
        for p in cls:
            if key in (p.value.lower(), p.name.lower(), p.value.lower().removeprefix("u-")):
                return p
        raise ValueError(f"unknown uncertainty policy {value!r}; use one of {[p.value for p in cls]}")


class Blank(str, Enum):
    """What a blank CheXpert cell means."""

    ZERO = "zero"  # the labeler did not mention it: treat as negative (the common choice)
    IGNORE = "ignore"  # no supervision

    @classmethod
    def parse(cls, value: "str | Blank") -> "Blank":
        if isinstance(value, Blank):
            return value
        try:
            return cls(value.strip().lower())
        except ValueError:
            raise ValueError(f"unknown blank handling {value!r}; use 'zero' or 'ignore'") from None


@dataclass(frozen=True)
class UncertaintyConfig:
    """A global policy with per-label overrides, e.g. the CheXpert paper's best recipe:
    UncertaintyConfig(Policy.ZEROS, {"Atelectasis": Policy.ONES, "Edema": Policy.ONES})."""

    default: Policy = Policy.ZEROS
    overrides: Mapping[str, Policy] = field(default_factory=dict)
    blank: Blank = Blank.ZERO

    def __post_init__(self) -> None:
        object.__setattr__(self, "default", Policy.parse(self.default))
        object.__setattr__(self, "blank", Blank.parse(self.blank))
        object.__setattr__(self, "overrides", {k: Policy.parse(v) for k, v in dict(self.overrides).items()})
        mc = [p == Policy.MULTICLASS for p in [self.default, *self.overrides.values()]]
        if any(mc) and not all(mc):
            # A model head is either binary or 3-way for all labels; mixing would need two heads.
            raise ValueError("U-MultiClass cannot be mixed with other policies; set it globally")

    def policy_for(self, name: str) -> Policy:
        return self.overrides.get(name, self.default)

    @property
    def multiclass(self) -> bool:
        return self.default == Policy.MULTICLASS

    def to_dict(self) -> dict:
        return {
            "default": self.default.value,
            "overrides": {k: v.value for k, v in self.overrides.items()},
            "blank": self.blank.value,
        }


class UnknownLabelValue(ValueError):
    """A label cell held something other than 1, 0, -1 or blank."""


ALLOWED_RAW = (1.0, 0.0, -1.0)


def apply_policy(raw: np.ndarray, policy: Policy, blank: Blank = Blank.ZERO) -> np.ndarray:
    """Map raw CheXpert values {1, 0, -1, NaN=blank} to training targets (float32).

    Raises UnknownLabelValue on anything else, so a corrupted CSV can't train silently.
    """
    raw = np.asarray(raw, dtype=np.float64)
    bad = ~(np.isnan(raw) | np.isin(raw, ALLOWED_RAW))
    if bad.any():
        raise UnknownLabelValue(f"label values outside {{1, 0, -1, blank}}: {sorted(set(raw[bad].tolist()))[:5]}")
    out = raw.astype(np.float32)
    uncertain = raw == -1.0
    if policy == Policy.IGNORE:
        out[uncertain] = np.nan
    elif policy == Policy.ZEROS:
        out[uncertain] = 0.0
    elif policy == Policy.ONES:
        out[uncertain] = 1.0
    elif policy == Policy.MULTICLASS:
        out[uncertain] = 2.0
    blank_mask = np.isnan(raw)
    out[blank_mask] = 0.0 if blank == Blank.ZERO else np.nan
    return out


def chexpert_space(names: Iterable[str] = CHEXPERT_14, config: UncertaintyConfig | None = None) -> LabelSpace:
    names = tuple(names)
    unknown = [n for n in names if n not in CHEXPERT_14]
    if unknown:
        raise ValueError(f"not CheXpert observations: {unknown}")
    multiclass = bool(config and config.multiclass)
    return LabelSpace(names, MULTILABEL, uncertain_classes=multiclass)


NAMED_SPACES: dict[str, tuple[str, ...]] = {
    "chexpert14": CHEXPERT_14,
    "chexpert5": CHEXPERT_5,
    "nih14": NIH_14,
    "kermany2": KERMANY_2,
    "kermany3": KERMANY_3,
    "synthetic": SYNTHETIC_FINDINGS,
}


def resolve_label_names(spec: str | Sequence[str] | None, default: Sequence[str]) -> tuple[str, ...]:
    """A named selection ('chexpert5'), a comma list, a list, or None for the default."""
    if spec is None or spec == "" or spec == []:
        return tuple(default)
    if isinstance(spec, str):
        if spec.lower() in NAMED_SPACES:
            return NAMED_SPACES[spec.lower()]
        return tuple(s.strip() for s in spec.split(",") if s.strip())
    return tuple(spec)
