"""The flag-driven job schemas: evaluate, score, serve, demo (train and manifest: config.py).

Their argparse flags and --help are generated from these fields (schema.add_flags); Serve's
application builder validates serve_config.yaml's `args:` block with `ServeArgs`.
"""
from __future__ import annotations

import os
from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from cxrray import storage
from cxrray.config import MODELS, ModelName
from cxrray.schema import ConfigError, build, schema

MiB = 1024 * 1024
# imaging.DEFAULT_MAX_PIXELS / DEFAULT_MAX_BYTES, spelled out: imaging imports the decoders.
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_BYTES = 128 * MiB
DEFAULT_CHUNK = 1024


@schema
class EvaluateConfig:
    """`cxrray evaluate`: the keyword arguments of cxrray.evaluate.evaluate."""

    artifact: str = Field(min_length=1, description="model artifact (dir, URI or models:/name/version)")
    manifest: str = Field(description="manifest with a split column")
    out: str = Field(min_length=1, description="folder for the report, plots, metrics.json and config.yaml")
    split: Literal["train", "valid", "test"] = Field("test", description="the split scored: train | valid | test")
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for AUROC CIs (0: none)")
    gallery_k: int = Field(4, ge=0, description="Grad-CAM gallery: top-k true and false positives per class (0: none)")
    batch_size: int = Field(64, ge=1, description="images per forward pass of the scoring actors")
    actors: Optional[int] = Field(None, ge=1, description="scoring actors (default: fill the cluster)")
    predictions: Optional[str] = Field(None, description="where the split's scores are written (default: in --out)")
    chunk_size: int = Field(DEFAULT_CHUNK, ge=1, description="images per scored part file (unit of resume)")
    ray_address: Optional[str] = Field(None, description="Ray cluster to join (default: RAY_ADDRESS or a local one)")
    label_policy: Literal["certain", "blank_negative", "train"] = Field(
        "certain", description="labels scored: certain (uncertain and blank masked) | blank_negative (uncertain "
                               "masked, blank = negative) | train (the model's training policy)")

    def kwargs(self) -> dict[str, Any]:
        """cxrray.evaluate.evaluate's arguments."""
        from dataclasses import asdict

        values = asdict(self)
        values["out_dir"] = values.pop("out")
        return values


@schema
class EnsembleConfig:
    """`cxrray ensemble`: member artifacts (one architecture and classes) -> one ensemble artifact,
    its thresholds chosen on the manifest's valid split (cxrray.ensemble.build_ensemble)."""

    members: list[str] = Field(description="member artifacts, comma-separated (dirs or URIs)")
    manifest: str = Field(description="manifest whose valid split picks the ensemble's thresholds")
    out: str = Field(min_length=1, description="the ensemble artifact's folder (local or URI)")
    tta: bool = Field(False, description="test-time augmentation: identity, +-5 deg rotations, 1.05 zoom")
    val_labels: Literal["certain", "blank_negative", "train"] = Field(
        "certain", description="labels the thresholds are chosen on: certain | blank_negative | train")
    actors: Optional[int] = Field(None, ge=1, description="scoring actors for the valid split (default: fill the "
                                                          "cluster)")
    ray_address: Optional[str] = Field(None, description="Ray cluster to join (default: RAY_ADDRESS or a local one)")

    _members = field_validator("members", mode="before")(
        lambda v: [m.strip() for m in v.split(",") if m.strip()] if isinstance(v, str) else v)


@schema
class ScoreConfig:
    """`cxrray score`: bulk scoring of an image archive into predictions Parquet."""

    artifact: str = Field(min_length=1, description="model artifact directory (model.pt + model.json)")
    input: str = Field(min_length=1, description="folder (recursive), glob, CSV/Parquet with a path column, or URI")
    out: str = Field(min_length=1, description="output folder of part-*.parquet files")
    batch_size: int = Field(32, ge=1, description="images per forward pass")
    chunk_size: int = Field(DEFAULT_CHUNK, ge=1, description="images per part file (unit of resume)")
    actors: Optional[int] = Field(None, ge=1, description="Predictor actors (default: fill the cluster)")
    cpus_per_actor: float = Field(1.0, gt=0, description="also the torch threads per actor")
    gpus_per_actor: Optional[float] = Field(None, ge=0, description="default: 1 if the cluster has GPUs")
    decode: Literal["auto", "actor", "task"] = Field(
        "auto", description="decode in the actors or a separate CPU task stage: auto | actor | task (auto: in the "
                            "actors; on GPUs a task stage unless decoder is auto/nvjpeg)")
    decoder: Literal["auto", "pil", "nvjpeg"] = Field(
        "auto", description="JPEG decoder: auto (nvJPEG on GPU actors, Pillow on CPU) | pil | nvjpeg")
    force_model: bool = Field(False, description="replace another model's predictions in --out (they are deleted)")
    strict: bool = Field(False, description="DICOMs that are not chest radiographs (modality not CR/DX, body part "
                                            "not chest) become error rows instead of scored rows with a warning")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="refuse larger images (too_large)")
    max_bytes: int = Field(DEFAULT_MAX_BYTES, ge=1, description="refuse larger files (too_large)")
    ray_address: Optional[str] = Field(None, description="Ray cluster to join (default: RAY_ADDRESS or a local one)")


@schema
class ServeArgs:
    """The application builder's arguments (the `args:` block of serve_config.yaml)."""

    artifact: str = Field("", description="artifact dir or URI (empty: $CXRRAY_ARTIFACT)")
    max_upload_bytes: int = Field(20 * MiB, ge=1, description="bigger bodies get 413")
    upload_idle_timeout_s: float = Field(15.0, gt=0, description="an upload that sends nothing for this long gets "
                                         "408 (a stalled client holds a request slot)")
    max_pixels: int = Field(40_000_000, ge=1, description="width*height cap checked from the header before decoding")
    max_batch_size: int = Field(16, ge=1, description="/predict forward passes batched up to this")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="how long a batch waits to fill (s)")
    explain_max_batch_size: int = Field(4, ge=1, description="/explain (forward + Grad-CAM backward) batches")
    max_targets: int = Field(4, ge=1, description="Grad-CAM classes per /explain request")
    device: str = Field("auto", description="auto (cuda when the replica has a GPU) | cpu | cuda[:N]",
                        pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    num_threads: int = Field(0, ge=0, description="torch threads; 0: the CPUs the replica reserved")
    overlay_max_side: int = Field(1024, ge=16, description="/explain overlays: the upload's size, long side capped (px)")
    strict: bool = Field(False, description="DICOMs that are not chest radiographs get a 422 instead of a warning")
    decoder: Literal["auto", "pil", "nvjpeg"] = Field(
        "auto", description="JPEG decoder: auto (nvJPEG on a GPU replica, Pillow on CPU) | pil | nvjpeg")
    deployment: dict[str, Any] = Field(default_factory=dict, description="Serve .options(...) overrides",
                                       json_schema_extra={"cli": False})

    @classmethod
    def from_dict(cls, args: "dict[str, Any] | None") -> "ServeArgs":
        """`serve run app artifact=... max_batch_size=8` passes strings: the schema types them."""
        args = dict(args or {})
        if not args.get("artifact"):
            args["artifact"] = os.environ.get("CXRRAY_ARTIFACT", "")
        if not args["artifact"]:
            raise ConfigError("artifact: required: serve needs artifact=<artifact dir> (or CXRRAY_ARTIFACT in the "
                              "environment)")
        # A relative artifact path is relative to the directory the builder runs in (your
        # shell's for `serve run`); resolve it here so replicas, whose working directory Ray
        # chooses, load the same files.
        args["artifact"] = storage.normalize(str(args["artifact"]))  # a URI stays as it is
        return build(cls, args, what="serve args")


@schema
class DemoConfig:
    """`cxrray demo`: the whole story on one local Ray cluster."""

    out: str = Field("demo_out", description="output folder (local or s3://...)")
    n_patients: int = Field(500, ge=20, description="synthetic patients to generate")
    size: int = Field(96, ge=32, le=1024, description="image size (px) for generation and the model")
    epochs: int = Field(8, ge=1, description="training epochs")
    seed: int = Field(0, description="seed of data, split and training")
    model: ModelName = Field("small_cnn", description=" | ".join(MODELS))
    num_workers: int = Field(2, ge=1, description="TorchTrainer workers", json_schema_extra={"flag": "--workers"})
    keep_serving: bool = Field(False, description="keep Serve running at the end and print the page URL",
                               json_schema_extra={"flag": "--serve"})
    port: int = Field(8000, ge=1, le=65535, description="Serve's HTTP port")
    source: Literal["synthetic", "chexpert", "nih", "kermany"] = Field(
        "synthetic", description="synthetic, or a real source: chexpert | nih | kermany (with --root)")
    root: Optional[str] = Field(None, description="dataset root for --source")
    score_actors: Optional[int] = Field(None, ge=1, description="scoring actors (default: fill the cluster)")

    @model_validator(mode="after")
    def _root(self):
        if self.source != "synthetic" and not self.root:
            raise ValueError(f"root: --source {self.source} needs --root (the dataset folder)")
        return self
