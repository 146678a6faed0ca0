"""Typed, frozen job configs read from YAML with `key=value` overrides; saved with outputs.

The CLI, `jobs/train.py` and the tests all go through `load_config`, and the resolved config
travels inside every artifact (`model.json`), so a model always says how it was made.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from cxrray import storage

T = TypeVar("T")


@dataclass(frozen=True)
class TrainConfig:
    # What to train on: a manifest with a `split` column. When it does not exist yet and a
    # source is given, `cxrray train` builds it (with the uncertainty policy below) first.
    manifest: str = "runs/manifest.parquet"
    source: str | None = None  # chexpert | synthetic | nih | kermany | csv
    root: str | None = None
    source_options: dict = field(default_factory=dict)  # e.g. {classes: 3} for kermany, {views: [frontal]}
    uncertainty: dict = field(default_factory=dict)  # {default: U-Zeros, overrides: {Edema: U-Ones}, blank: zero}
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    labels: list[str] | str | None = None  # subset/named selection of the manifest's label space
    data_format: str = "raw"  # raw: decode files each epoch; shards: `cxrray prepare` Parquet shards
    shards_dir: str | None = None

    # Model
    model: str = "densenet121"
    pretrained: str | None = None  # None | "imagenet" (torch hub cache) | path to a weights file
    freeze_backbone: bool = False  # transfer learning: train the head only
    image_size: int = 224
    channels: int = 3  # 3: replicate grey; 1: adapt the first conv

    # Optimisation
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    loss: str = "bce"  # bce | weighted_bce | focal | ce (multi-class)
    upsample: bool = False  # repeat rare-class positives instead of (or as well as) weighting
    scheduler: str = "cosine"  # cosine | plateau | none
    warmup_epochs: int = 0
    grad_clip: float | None = 1.0
    precision: str = "auto"  # auto (bf16 on GPUs that have it, else fp16) | bf16 | fp16 | off; CPU is always fp32
    early_stopping_patience: int = 0  # epochs without val mean AUROC gain; 0 = off
    max_steps_per_epoch: int | None = None  # cap, for smoke runs
    seed: int = 0

    # Augmentation
    aug_scale: tuple[float, float] = (0.85, 1.0)
    aug_rotation: float = 7.0
    aug_brightness: float = 0.1
    aug_contrast: float = 0.1
    hflip: bool = False  # mirrors the anatomy (heart side), so off by default

    # Ray
    run_name: str = "cxrray"
    storage_path: str = "runs"
    num_workers: int = 2
    use_gpu: str | bool = "auto"  # auto: when the cluster has GPUs
    cpus_per_worker: int = 1
    max_failures: int = 2
    # PACK (Ray's default) fills one node first; SPREAD/STRICT_SPREAD put workers on different nodes.
    placement_strategy: str = "PACK"
    ray_address: str | None = None

    # Experiment tracking (MLflow, cxrray/tracking.py): params, per-epoch metrics, plots and the
    # best artifact. The default store needs no server: sqlite:///<storage_path>/mlflow.db with
    # artifacts in <storage_path>/mlruns. SQLite cannot live on an object store, so with an
    # s3://... storage_path tracking is off unless tracking_uri (or MLFLOW_TRACKING_URI) is set.
    tracking: bool = True
    tracking_uri: str | None = None  # http://mlflow:5000, sqlite:////shared/mlflow.db, ...; beats MLFLOW_TRACKING_URI
    experiment: str = "cxrray"  # the MLflow experiment's name

    def resolved_storage(self) -> str:
        """An absolute local path, or the URI as given: Ray Train takes `s3://...` unchanged."""
        return storage.normalize(self.storage_path)

    @property
    def run_dir(self) -> str:
        return storage.join(self.resolved_storage(), self.run_name)


def _coerce(cls_field: dataclasses.Field, value: Any) -> Any:
    """YAML gives lists where the dataclass wants tuples; keep the declared shape."""
    if isinstance(value, list) and str(cls_field.type).startswith("tuple"):
        return tuple(value)
    return value


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """['epochs=3', 'lr=0.01', 'labels=[Edema,Cardiomegaly]'] -> typed dict via YAML scalars."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw != "" else None
    return out


def build(cls: type[T], values: dict[str, Any]) -> T:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; valid keys: {sorted(known)}")
    return cls(**{k: _coerce(known[k], v) for k, v in values.items()})


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    values: dict[str, Any] = {}
    if path:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config {path} does not exist (shipped configs live in jobs/configs/)")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a config must be a YAML mapping of key: value")
    values.update(parse_overrides(overrides))
    return build(cls, values)


def to_dict(cfg: Any) -> dict:
    d = asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def save_config(cfg: Any, path: str | Path) -> str:
    """The resolved config as YAML, beside a job's outputs (a local path or a URI)."""
    return storage.write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
