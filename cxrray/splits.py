"""Patient-grouped, label-stratified splits, and the leakage check that verifies them.

No patient may sit in two splits: a model that saw a patient's other films in training
scores optimistically on them. `assign_splits` groups rows by patient and stratifies by
label greedily (after Sechidis et al. 2011, "On the stratification of multi-label data",
adapted to groups); `check_leakage` checks any manifest, including official splits,
for shared patients and byte-identical images across splits. Pure apart from reading
file bytes for hashing; no Ray.
"""
from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from cxrray import storage
from cxrray.labels import LabelSpace

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "valid", "test")


# ----------------------------------------------------------------------------- assign_splits


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
    f = np.asarray(fractions, dtype=float)
    if f.shape != (3,) or (f < 0).any() or not np.isclose(f.sum(), 1.0, atol=1e-3):
        raise ValueError(f"fractions must be three non-negative numbers (train, valid, test) summing to 1, got {fractions}")
    return f / f.sum()


def _positives(df: pd.DataFrame, space: LabelSpace) -> np.ndarray:
    """Rows x classes, 1 where the label is positive (NaN, 0 and U-MultiClass 'uncertain' are not)."""
    if not space.names:
        return np.zeros((len(df), 0))
    return (df[list(space.columns)].to_numpy(dtype=np.float32) == 1.0).astype(np.float64)


def _greedy_assign(n_rows: np.ndarray, pos: np.ndarray, fractions: np.ndarray, pinned: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
    """Split index per patient group.

    Patients holding the rarest labels go first; each goes to the split furthest below its
    target (relative deficit) for the patient's rarest label, then for all its labels, then
    for image count, then at random. Relative deficits give every split a share of a rare
    label as soon as a few patients have it. Patients without positives go last and fill
    the image-count targets. pinned[i] >= 0 forces a split (official rows of that patient).
    """
    n_pat, n_cls = pos.shape
    active = [s for s in range(3) if fractions[s] > 0]
    label_total = pos.sum(axis=0)
    want_rows = fractions * n_rows.sum()
    want_lab = fractions[:, None] * label_total[None, :]
    got_rows = np.zeros(3)
    got_lab = np.zeros((3, n_cls))

    has = pos > 0
    rarity = np.where(has, label_total[None, :], np.inf)
    rarest = rarity.argmin(axis=1) if n_cls else np.zeros(n_pat, dtype=int)
    rarest_count = rarity.min(axis=1) if n_cls else np.full(n_pat, np.inf)
    jitter = rng.random(n_pat)
    order = np.lexsort((jitter, rarest_count))
    ties = rng.random((n_pat, 3))

    def rel(want: float, got: float) -> float:
        return (want - got) / want if want > 0 else -np.inf

    out = np.full(n_pat, -1, dtype=int)
    for i in order:
        if pinned[i] >= 0:
            s = int(pinned[i])
        else:
            labels = np.flatnonzero(has[i]) if n_cls else ()
            if len(labels):
                k = rarest[i]
                scores = [(rel(want_lab[s, k], got_lab[s, k]),
                           float(np.mean((want_lab[s, labels] - got_lab[s, labels]) / want_lab[s, labels])),
                           rel(want_rows[s], got_rows[s]), ties[i, s]) for s in active]
            else:
                scores = [(rel(want_rows[s], got_rows[s]), ties[i, s]) for s in active]
            s = active[max(range(len(active)), key=scores.__getitem__)]
        out[i] = s
        got_rows[s] += n_rows[i]
        if n_cls:
            got_lab[s] += pos[i]
    return out


def assign_splits(
    df: pd.DataFrame,
    label_space: LabelSpace,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    respect_existing: bool = False,
) -> pd.DataFrame:
    """A copy of `df` with `split` set to train/valid/test, grouped by `patient_id`.

    fractions: (train, valid, test) in images. Same seed, same split, whatever the row
    order. respect_existing: rows already in "valid" or "test" (an official split) stay;
    the other rows are shared among the splits that have no official rows, e.g. NIH's
    official test stays and valid is carved out of train by patient. A patient with
    official rows pulls its other rows into that split. The old split is kept in
    `source_split` when that column doesn't exist yet.
    """
    f = _check_fractions(fractions)
    out = df.copy()
    existing = out["split"] if "split" in out.columns else pd.Series(None, index=out.index, dtype=object)
    if "source_split" not in out.columns and existing.notna().any():
        out["source_split"] = existing
    fixed = existing.where(existing.isin(["valid", "test"])) if respect_existing else pd.Series(
        np.nan, index=out.index, dtype=object)
    is_fixed = fixed.notna().to_numpy()
    if respect_existing:
        for s, name in enumerate(SPLITS[1:], start=1):
            if (fixed == name).any():
                f[s] = 0.0
        if f.sum() == 0:
            f[0] = 1.0
        f = f / f.sum()

    codes, patients = pd.factorize(out["patient_id"].astype(str), sort=True)
    n_pat = len(patients)
    pinned = np.full(n_pat, -1, dtype=int)
    if is_fixed.any():
        fixed_idx = fixed[is_fixed].map({n: i for i, n in enumerate(SPLITS)}).to_numpy(dtype=int)
        pinned[codes[is_fixed]] = fixed_idx
        both = pd.Series(fixed_idx).groupby(codes[is_fixed]).nunique()
        if (both > 1).any():
            log.warning("%d patients have official rows in both valid and test; check_leakage will list them",
                        int((both > 1).sum()))
        pulled = int((~is_fixed & (pinned[codes] >= 0)).sum())
        if pulled:
            log.warning("%d rows join their patient's official valid/test split to keep the patient whole", pulled)

    pool = ~is_fixed
    n_rows = np.bincount(codes[pool], minlength=n_pat).astype(float)
    pos_rows = _positives(out, label_space)
    pos = np.stack([np.bincount(codes[pool], weights=pos_rows[pool, k], minlength=n_pat)
                    for k in range(pos_rows.shape[1])], axis=1) if pos_rows.shape[1] else np.zeros((n_pat, 0))
    in_pool = n_rows > 0
    assigned = np.full(n_pat, -1, dtype=int)
    idx = np.flatnonzero(in_pool)
    assigned[idx] = _greedy_assign(n_rows[idx], pos[idx], f, pinned[idx], np.random.default_rng(seed))

    split = np.array(SPLITS, dtype=object)[assigned[codes]]
    split[is_fixed] = fixed[is_fixed].to_numpy()
    out["split"] = split
    counts = out["split"].value_counts()
    log.info("split %d images of %d patients: %s", len(out), n_pat,
             ", ".join(f"{s} {counts.get(s, 0):,}" for s in SPLITS))
    return out


# ----------------------------------------------------------------------------- hashing


def sha1_file(path: str) -> str | None:
    """sha1 of a file's bytes, or None when it can't be read."""
    try:
        h = hashlib.sha1()
        with (storage.open_input(path) if storage.is_uri(path) else open(path, "rb")) as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    except (OSError, TypeError, ValueError):
        return None


def hash_files(paths: Sequence[str], max_workers: int | None = None) -> list[str | None]:
    """sha1 of each file (None when unreadable), in a thread pool: the work is I/O."""
    workers = max_workers or min(8, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(sha1_file, list(paths), chunksize=64))


def duplicate_groups(ids: pd.Series, hashes: pd.Series) -> list[list[str]]:
    """Groups (each sorted) of ids with equal hashes; largest first, then by first id."""
    frame = pd.DataFrame({"id": np.asarray(ids, dtype=object), "h": np.asarray(hashes, dtype=object)}).dropna()
    dup = frame[frame["h"].duplicated(keep=False)]
    groups = [sorted(g["id"].tolist()) for _, g in dup.groupby("h", sort=False)]
    return sorted(groups, key=lambda g: (-len(g), g[0]))


# ----------------------------------------------------------------------------- check_leakage


def _order(splits) -> list[str]:
    return [s for s in SPLITS if s in splits] + sorted(s for s in splits if s not in SPLITS)


@dataclass
class LeakageReport:
    """Patients and identical images that appear in more than one split."""

    split_counts: dict[str, int]
    shared_patients: dict[str, list[str]]  # "train-valid" -> patient ids in both
    duplicate_images: list[list[str]] = field(default_factory=list)  # image_id groups spanning splits
    hashed: int = 0
    unreadable: int = 0
    unassigned: int = 0  # rows without a split, left out of the check
    duplicates_within_split: int = 0  # identical-image groups inside one split (not leakage)
    hash_images: bool = True

    @property
    def n_shared_patients(self) -> int:
        return len({p for ps in self.shared_patients.values() for p in ps})

    @property
    def ok(self) -> bool:
        return self.n_shared_patients == 0 and not self.duplicate_images

    def summary(self) -> str:
        n = sum(self.split_counts.values())
        splits = ", ".join(f"{k} {v:,}" for k, v in self.split_counts.items())
        text = f"Leakage check over {n:,} images ({splits}): "
        if self.n_shared_patients:
            pairs = ", ".join(f"{k} {len(v)}" for k, v in self.shared_patients.items() if v)
            first = next(v for v in self.shared_patients.values() if v)
            text += (f"{self.n_shared_patients:,} patients appear in more than one split ({pairs}; "
                     f"e.g. {', '.join(first[:3])}); ")
        else:
            text += "no patient appears in two splits; "
        if not self.hash_images:
            text += "image contents not compared (hash_images=False)"
        elif self.duplicate_images:
            text += (f"{len(self.duplicate_images)} groups of byte-identical images span splits "
                     f"(e.g. {', '.join(self.duplicate_images[0][:2])})")
        else:
            text += "no byte-identical image spans splits"
        if self.hash_images:
            text += f" ({self.hashed:,} hashed" + (f", {self.unreadable:,} unreadable" if self.unreadable else "") + ")"
        if self.unassigned:
            text += f"; {self.unassigned:,} rows without a split were not checked"
        text += ". " + ("OK." if self.ok else
                        "LEAK: re-split by patient (assign_splits) or drop the listed images before trusting scores.")
        return text

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        d["n_shared_patients"] = self.n_shared_patients
        d["summary"] = self.summary()
        return d


def check_leakage(df: pd.DataFrame, *, hash_images: bool = True, max_workers: int | None = None) -> LeakageReport:
    """Shared patients between every pair of splits and, with hash_images, byte-identical
    images across splits (sha1 of the file; an existing `sha1` column is reused)."""
    has_split = df["split"].notna().to_numpy() if "split" in df.columns else np.zeros(len(df), dtype=bool)
    d = df.loc[has_split]
    counts = d["split"].value_counts()
    order = _order(set(counts.index))
    shared: dict[str, list[str]] = {}
    pairs = d[["patient_id", "split"]].astype(str).drop_duplicates()
    by_split = {s: set(pairs.loc[pairs["split"] == s, "patient_id"]) for s in order}
    for i, a in enumerate(order):
        for b in order[i + 1:]:
            shared[f"{a}-{b}"] = sorted(by_split[a] & by_split[b])
    report = LeakageReport({s: int(counts[s]) for s in order}, shared, unassigned=int((~has_split).sum()),
                           hash_images=hash_images)
    if hash_images and len(d):
        hashes = d["sha1"] if "sha1" in d.columns and d["sha1"].notna().all() else pd.Series(
            hash_files(d["path"].astype(str).tolist(), max_workers), index=d.index)
        report.unreadable = int(hashes.isna().sum())
        report.hashed = len(d) - report.unreadable
        if report.unreadable:
            log.warning("%d images could not be read for hashing", report.unreadable)
        frame = pd.DataFrame({"id": d["image_id"].astype(str), "h": hashes, "split": d["split"]}).dropna()
        multi = frame[frame["h"].duplicated(keep=False)]
        spans = multi.groupby("h")["split"].nunique()
        across = set(spans.index[spans > 1])
        report.duplicate_images = duplicate_groups(multi.loc[multi["h"].isin(across), "id"],
                                                   multi.loc[multi["h"].isin(across), "h"])
        report.duplicates_within_split = int((spans == 1).sum())
    log.info(report.summary())
    return report
