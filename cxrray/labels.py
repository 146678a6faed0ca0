"""Label spaces and CheXpert uncertainty policies. Pure: no Ray, no torch.

A label space is an ordered tuple of class names plus a task kind. It travels with every
manifest, artifact and prediction file, so the column order can never silently change.

Manifest label values are float32 per class, in one of two encodings (`LabelSpace.values`):
- "targets": numbers in [0, 1], NaN = no supervision (NIH, Kermany, CSV, DICOM sources);
- "chexpert": what the report labeler wrote, 1 / 0 / -1 (uncertain) / NaN (blank: not
  mentioned), kept raw. The uncertainty policy is a training choice, not a property of the
  data, so it is applied where targets are built (`TargetMap`), never baked into a manifest.

`TargetMap` turns raw values into loss targets (the training policy) or metric targets (an
evaluation policy: certain labels only by default). Under U-MultiClass each label keeps three
states, encoded 0 (negative), 1 (positive), 2 (uncertain), and the model predicts a 3-way
softmax per label.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterable, Mapping, Sequence

import numpy as np

MULTILABEL = "multilabel"
MULTICLASS = "multiclass"
TARGET_VALUES = "targets"  # label cells are targets in [0, 1]; NaN = no supervision
CHEXPERT_VALUES = "chexpert"  # label cells are the labeler's raw 1 / 0 / -1 / blank

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

    `uncertain_classes` is True only for a model trained under CheXpert U-MultiClass, where
    each name is a 3-state label (negative / positive / uncertain) rather than a binary one.
    `values` says how a manifest's label cells are encoded (module docstring); a model's own
    space is always "targets".
    """

    names: tuple[str, ...]
    task: str = MULTILABEL
    uncertain_classes: bool = False
    values: str = TARGET_VALUES

    def __post_init__(self) -> None:
        if self.task not in (MULTILABEL, MULTICLASS):
            raise ValueError(f"task must be {MULTILABEL!r} or {MULTICLASS!r}, got {self.task!r}")
        # An empty label space is allowed: an unlabelled folder manifest, used for scoring.
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"label names must be unique: {self.names}")
        if self.uncertain_classes and self.task != MULTILABEL:
            raise ValueError("uncertain_classes (U-MultiClass) only applies to multi-label tasks")
        if self.values not in (TARGET_VALUES, CHEXPERT_VALUES):
            raise ValueError(f"values must be {TARGET_VALUES!r} or {CHEXPERT_VALUES!r}, got {self.values!r}")
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

    @property
    def raw_uncertain(self) -> bool:
        """The label cells are raw CheXpert values (-1 uncertain, NaN blank), not targets."""
        return self.values == CHEXPERT_VALUES

    def to_dict(self) -> dict:
        return {"names": list(self.names), "task": self.task, "uncertain_classes": self.uncertain_classes,
                "values": self.values}

    @classmethod
    def from_dict(cls, d: Mapping) -> "LabelSpace":
        # Spaces written before `values` existed hold targets (a policy was applied at build time).
        return cls(tuple(d["names"]), d.get("task", MULTILABEL), bool(d.get("uncertain_classes", False)),
                   d.get("values", TARGET_VALUES))

    def select(self, names: Sequence[str]) -> "LabelSpace":
        missing = [n for n in names if n not in self.names]
        if missing:
            raise ValueError(f"unknown classes {missing}; this label space has {list(self.names)}")
        return LabelSpace(tuple(names), self.task, self.uncertain_classes, self.values)

    def for_model(self, uncertainty: "UncertaintyConfig") -> "LabelSpace":
        """The label space of a model trained on this manifest space under `uncertainty`: a
        3-way head per label under U-MultiClass; its targets are always targets."""
        if uncertainty.multiclass and not self.raw_uncertain:
            raise ValueError("U-MultiClass needs uncertain labels (a chexpert or synthetic manifest); this "
                             "manifest's labels have no uncertain state")
        return LabelSpace(self.names, self.task, uncertainty.multiclass and self.raw_uncertain, TARGET_VALUES)


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

    def describe(self) -> str:
        """'U-Zeros (Atelectasis: U-Ones), blank zero': how logs and reports name it."""
        extra = f" ({', '.join(f'{k}: {v.value}' for k, v in self.overrides.items())})" if self.overrides else ""
        return f"{self.default.value}{extra}, blank {self.blank.value}"

    @classmethod
    def from_dict(cls, d: "Mapping | None") -> "UncertaintyConfig":
        return cls(**dict(d)) if d else cls()

    def to_dict(self) -> dict:
        return {
            "default": self.default.value,
            "overrides": {k: v.value for k, v in self.overrides.items()},
            "blank": self.blank.value,
        }


class UnknownLabelValue(ValueError):
    """A label cell held something other than 1, 0, -1 or blank."""


ALLOWED_RAW = (1.0, 0.0, -1.0)
_POLICY_VALUE = {Policy.IGNORE: np.nan, Policy.ZEROS: 0.0, Policy.ONES: 1.0, Policy.MULTICLASS: 2.0}

# How an evaluation (and training's validation) reads raw labels:
# - certain: only what the labeler stated, 1 and 0; uncertain (-1) and blank are masked. What
#   CheXpert's own protocol measures (its valid.csv has neither).
# - blank_negative: uncertain masked, blank (not mentioned) counted as negative; for held-out
#   splits of train.csv, where most negatives are blank.
# - train: the model's training policy (what the loss saw).
EVAL_LABEL_POLICIES: tuple[str, ...] = ("certain", "blank_negative", "train")


@dataclass(frozen=True)
class TargetMap:
    """What each label column's raw value becomes as a target: 1 and 0 (and soft targets) stay;
    uncertain (-1) and blank (NaN) become, per column, NaN (masked), 0, 1 or 2 (U-MultiClass's
    uncertain state). The one place an uncertainty policy is applied: training's loss targets,
    validation and evaluation all call one of these. Picklable, so Ray Data decode tasks apply
    it to each batch."""

    uncertain: tuple[float, ...]
    blank: tuple[float, ...]
    raw: bool  # the cells are raw CheXpert values: anything outside {1, 0, -1, blank} is refused
    name: str  # how reports and model.json name it

    def __call__(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float32)
        if values.ndim != 2 or values.shape[1] != len(self.blank):
            raise ValueError(f"labels must be [N, {len(self.blank)}], got {values.shape}")
        blank = np.isnan(values)
        uncertain = values == -1.0
        bad = ~(blank | np.isin(values, ALLOWED_RAW)) if self.raw else ~blank & ((values < 0) | (values > 1))
        if bad.any():
            allowed = "{1, 0, -1, blank}" if self.raw else "[0, 1] or blank"
            raise UnknownLabelValue(f"label values outside {allowed}: {sorted(set(values[bad].tolist()))[:5]}")
        out = np.where(uncertain, np.asarray(self.uncertain, np.float32), values)
        return np.where(blank, np.asarray(self.blank, np.float32), out).astype(np.float32)

    def excluded(self, values: np.ndarray, names: Sequence[str]) -> dict[str, dict[str, int]]:
        """Per class, how many cells this map masks and why: {"uncertain": n, "blank": m}."""
        values = np.asarray(values, dtype=np.float32)
        out = {}
        for k, name in enumerate(names):
            col = values[:, k]
            out[name] = {"uncertain": int((col == -1.0).sum()) if np.isnan(self.uncertain[k]) else 0,
                         "blank": int(np.isnan(col).sum()) if np.isnan(self.blank[k]) else 0}
        return out

    @classmethod
    def training(cls, space: LabelSpace, uncertainty: "UncertaintyConfig") -> "TargetMap":
        """Loss targets under the training policy. Target-valued manifests pass through (blank
        = no supervision); raw CheXpert values get the policy per label and blank handling."""
        k = space.num_classes
        if not space.raw_uncertain:
            return cls((np.nan,) * k, (np.nan,) * k, False, "targets as given")
        blank = 0.0 if uncertainty.blank == Blank.ZERO else np.nan
        return cls(tuple(_POLICY_VALUE[uncertainty.policy_for(n)] for n in space.names), (blank,) * k, True,
                   uncertainty.describe())

    @classmethod
    def evaluation(cls, space: LabelSpace, policy: str, uncertainty: "UncertaintyConfig | None" = None) -> "TargetMap":
        """Metric targets under an evaluation policy (EVAL_LABEL_POLICIES); `train` needs the
        model's training policy."""
        if policy not in EVAL_LABEL_POLICIES:
            raise ValueError(f"label policy must be one of {', '.join(EVAL_LABEL_POLICIES)}, got {policy!r}")
        if policy == "train":
            return cls.training(space, uncertainty or UncertaintyConfig())
        k = space.num_classes
        blank = 0.0 if policy == "blank_negative" and space.raw_uncertain else np.nan
        name = "certain labels (uncertain and blank masked)" if policy == "certain" else \
            "certain labels, blank as negative (uncertain masked)"
        return cls((np.nan,) * k, (blank,) * k, space.raw_uncertain, name)


def apply_policy(raw: np.ndarray, policy: Policy, blank: Blank = Blank.ZERO) -> np.ndarray:
    """One column of raw CheXpert values {1, 0, -1, NaN=blank} as training targets (float32):
    TargetMap.training for a single label. Raises UnknownLabelValue on anything else."""
    space = LabelSpace(("label",), values=CHEXPERT_VALUES)
    cfg = UncertaintyConfig(policy, blank=blank)
    return TargetMap.training(space, cfg)(np.asarray(raw, dtype=np.float32).reshape(-1, 1))[:, 0]


def chexpert_space(names: Iterable[str] = CHEXPERT_14) -> LabelSpace:
    """A manifest space of CheXpert observations, holding the labeler's raw values."""
    names = tuple(names)
    unknown = [n for n in names if n not in CHEXPERT_14]
    if unknown:
        raise ValueError(f"not CheXpert observations: {unknown}")
    return LabelSpace(names, MULTILABEL, values=CHEXPERT_VALUES)


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
