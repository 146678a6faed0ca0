"""Kermany et al. 2018 pediatric pneumonia: chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/.

Class from the folder; bacterial vs viral and the patient from the file name:
  PNEUMONIA  person12_bacteria_47.jpeg, person1_virus_6.jpeg (one file: person447_virus_921_1.jpeg)
  NORMAL     IM-0011-0001.jpeg, IM-0011-0001-0002.jpeg, NORMAL2-IM-1234-0001.jpeg

Patient ids. PNEUMONIA files carry `personN`. NORMAL files carry no person number; we
take the series number as the patient: `IM-0011-0001.jpeg`, `IM-0011-0002.jpeg`,
`IM-0011-0001-0002.jpeg` and `NORMAL2-IM-0011-0001.jpeg` are all patient `IM-0011`. This
errs on the side of grouping. Nothing in the release says whether the number is a child,
a visit or an export counter, nor whether the `NORMAL2-` series (328 of its numbers also
occur in the `IM-` series) numbers the same children: a too-large group only coarsens
the split, a too-small one can leak a child across splits. Normal and pneumonia ids
can't be linked at all; the leakage check's content hashing is the backstop (the
release holds byte-identical files under different numbers).
Pure apart from reading file bytes for the duplicate check.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from cxrray.labels import KERMANY_2, KERMANY_3, MULTICLASS, LabelSpace
from cxrray.manifest import ManifestError, Skipped, SourceResult
from cxrray.sources.generic import finish
from cxrray.splits import duplicate_groups, hash_files

log = logging.getLogger(__name__)

SPLIT_DIRS = {"train": "train", "val": "valid", "valid": "valid", "test": "test"}
CLASS_DIRS = ("NORMAL", "PNEUMONIA")
_EXT = r"\.(?:jpe?g|png)$"
PNEUMONIA_RE = re.compile(r"^(?P<patient>person\d+)_(?P<kind>bacteria|virus)_\d+(?:_\d+)*" + _EXT, re.I)
NORMAL_RE = re.compile(r"^(?:NORMAL2-)?(?P<patient>IM-\d+)-\d+(?:-\d+)*" + _EXT, re.I)


def find_root(root: str | Path) -> Path:
    """The folder holding train/ (and val/, test/): root, root/chest_xray, or root/chest_xray/chest_xray."""
    root = Path(root)
    for cand in (root, root / "chest_xray", root / "chest_xray" / "chest_xray"):
        if any((cand / d).is_dir() for d in SPLIT_DIRS):
            return cand
    raise ManifestError(
        f"{root}: no train/, val/ or test/ folder here nor in {root}/chest_xray/; pass the folder "
        f"holding the Kermany chest_xray/{{train,val,test}}/{{NORMAL,PNEUMONIA}} layout")


def parse_name(class_dir: str, filename: str) -> tuple[str, str] | str:
    """(patient_id, subtype normal|bacteria|virus), or the reason the name doesn't fit."""
    if class_dir == "PNEUMONIA":
        m = PNEUMONIA_RE.match(filename)
        if m:
            return m["patient"].lower(), m["kind"].lower()
        if NORMAL_RE.match(filename):
            return "a NORMAL-style name in the PNEUMONIA folder"
        return "expected personN_bacteria_M.jpeg or personN_virus_M.jpeg"
    m = NORMAL_RE.match(filename)
    if m:
        return m["patient"].upper(), "normal"
    if PNEUMONIA_RE.match(filename):
        return "a pneumonia-style name (personN_...) in the NORMAL folder"
    return "expected IM-NNNN-NNNN.jpeg or NORMAL2-IM-NNNN-NNNN.jpeg"


def load_kermany(root: str | Path, *, classes: int = 2, check_duplicates: bool = True) -> SourceResult:
    """Kermany folders -> manifest (multiclass, one-hot float columns).

    classes=2: NORMAL / PNEUMONIA; classes=3: NORMAL / BACTERIAL / VIRAL. Splits are the
    official folders (val -> valid). check_duplicates hashes every file (sha1 column) and
    lists byte-identical groups in info["duplicate_groups"].
    """
    if classes not in (2, 3):
        raise ValueError(f"classes must be 2 or 3, got {classes!r}")
    base = find_root(root)
    space = LabelSpace(KERMANY_2 if classes == 2 else KERMANY_3, MULTICLASS)
    skipped = Skipped()
    rows = []
    for split_dir in sorted(os.listdir(base)):
        if split_dir not in SPLIT_DIRS or not (base / split_dir).is_dir():
            continue
        for class_dir in CLASS_DIRS:
            folder = base / split_dir / class_dir
            if not folder.is_dir():
                continue
            for f in sorted(os.listdir(folder)):
                if f.startswith("."):
                    continue
                rel = f"{split_dir}/{class_dir}/{f}"
                parsed = parse_name(class_dir, f)
                if isinstance(parsed, str):
                    skipped.add(rel, "unparseable_path", parsed)
                    continue
                rows.append((rel, *parsed, SPLIT_DIRS[split_dir]))
    if not rows:
        raise ManifestError(f"{base}: no images in {{train,val,test}}/{{NORMAL,PNEUMONIA}}/")
    df = pd.DataFrame(rows, columns=["image_id", "patient_id", "subtype", "split"])
    base_abs = os.path.abspath(base)
    df["path"] = base_abs + "/" + df["image_id"]
    df["study_id"] = None
    df["view"] = None  # the release doesn't say; pediatric AP is likely but unrecorded
    target = {"normal": 0, "bacteria": 1, "virus": 2 if classes == 3 else 1}
    onehot = np.eye(len(space.names), dtype=np.float32)[df["subtype"].map(target).to_numpy()]
    for j, n in enumerate(space.names):
        df[n] = onehot[:, j]
    df["source_split"] = df["split"]

    info: dict = {"root": base_abs, "classes": classes}
    extra = ""
    if check_duplicates:
        df["sha1"] = hash_files(df["path"].tolist())
        unreadable = df["sha1"].isna()
        for rel in df.loc[unreadable, "image_id"]:
            skipped.add(rel, "unreadable_file", "could not read the file's bytes")
        df = df.loc[~unreadable]
        groups = duplicate_groups(df["image_id"], df["sha1"])
        info["duplicate_groups"] = groups
        info["n_duplicate_groups"] = len(groups)
        extra = (f"{len(groups)} groups of byte-identical images "
                 f"({sum(len(g) for g in groups)} files; see info['duplicate_groups'])")
    return finish("kermany", df, space, skipped, info, extra)
