"""The YAML-driven job schemas: training (`TrainConfig`) and manifest building (`ManifestConfig`).

The CLI, `jobs/train.py` and the tests all go through `load_config`; the resolved config is
saved beside the run and travels inside every artifact (`model.json`), so a model always says
how it was made. The flag-driven jobs (evaluate, score, serve, demo) are in job_configs.py;
reading, error lines and --help are schema.py's. No Ray, no torch: validation runs before
either is imported.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from cxrray import storage
from cxrray.schema import ConfigError, build, load_config, parse_overrides, save_config, schema, to_dict

# Spelled out rather than imported: cxrray.models, losses and sources pull in torch and pandas,
# and validation must stay fast. tests/test_config.py checks each equals its registry.
MODELS = ("densenet121", "resnet50", "vgg16", "inception_v3", "small_cnn", "tiny_cnn")
LOSSES = ("bce", "weighted_bce", "focal", "ce", "aucm")
SOURCES = ("chexpert", "synthetic", "nih", "kermany", "csv", "folder", "dicom")
ModelName = Literal["densenet121", "resnet50", "vgg16", "inception_v3", "small_cnn", "tiny_cnn"]
SourceName = Literal["chexpert", "synthetic", "nih", "kermany", "csv", "folder", "dicom"]
Fractions = tuple[float, float, float]


def split_commas(value: Any) -> Any:
    """`frontal,lateral` on a command line is the list [frontal, lateral]."""
    if isinstance(value, str) and "," in value:
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def check_fractions(value: Fractions | None) -> Fractions | None:
    if value is not None and (min(value) < 0 or abs(sum(value) - 1.0) > 1e-6):
        raise ValueError(f"train,valid,test fractions must be >= 0 and sum to 1 (they sum to {sum(value):g})")
    return value


@schema
class UncertaintySpec:
    """CheXpert's uncertain (-1) and blank cells: a policy, per-label overrides, blank handling."""

    default: str = Field("U-Zeros", description="U-Ignore | U-Zeros | U-Ones | U-MultiClass")
    overrides: dict[str, str] = Field(default_factory=dict, description="per label, e.g. {Edema: U-Ones}")
    blank: str = Field("zero", description="blank cells: zero | ignore")

    @model_validator(mode="after")
    def _canonical(self):
        from cxrray.labels import Blank, Policy, UncertaintyConfig

        object.__setattr__(self, "default", Policy.parse(self.default).value)
        object.__setattr__(self, "blank", Blank.parse(self.blank).value)
        object.__setattr__(self, "overrides", {k: Policy.parse(v).value for k, v in self.overrides.items()})
        UncertaintyConfig(self.default, self.overrides, self.blank)  # refuses U-MultiClass mixed with others
        return self

    def to_policy(self):
        from cxrray.labels import UncertaintyConfig

        return UncertaintyConfig(self.default, dict(self.overrides), self.blank)


def _uncertainty(value: Any) -> Any:
    """A bare policy name is the global policy; `{}` (older configs) is the source's default."""
    if isinstance(value, str):
        return {"default": value}
    return None if value == {} else value


MOVED_UNCERTAINTY = ("uncertainty: manifests keep the raw 1/0/-1/blank labels; the uncertainty policy is a "
                     "training key now (`uncertainty: U-Ones` in the train config), so one manifest serves every "
                     "policy")

# Which loader options each source takes (the adapters' keyword arguments; the CLI's flags).
LOADER_OPTIONS: dict[str, tuple[str, ...]] = {
    "chexpert": ("labels", "views", "ap_pa", "official_split", "check_files"),
    "synthetic": ("labels", "views", "ap_pa", "official_split", "check_files"),
    "nih": ("csv", "images_dir", "train_val_list", "test_list", "bbox_csv", "check_files"),
    "kermany": ("classes", "check_duplicates"),
    "csv": ("path_col", "label_cols", "class_col", "classes", "patient_col", "study_col", "view_col", "split_col",
            "task", "check_files"),
    "folder": ("recursive",),
    "dicom": ("labels_csv", "join_on", "label_cols", "task", "salt", "check_pixels"),
}


@schema
class ManifestConfig:
    """`cxrray manifest`, and the manifest `cxrray train` and `cxrray demo` build (manifest_build.py)."""

    source: SourceName = Field(description="dataset layout: " + " | ".join(SOURCES))
    root: str = Field(min_length=1, description="dataset root (for csv: the CSV file)")
    out: str = Field(min_length=1, description="manifest .parquet to write (local path or URI)")
    split: Optional[Fractions] = Field(None, description="train,valid,test fractions by patient (none: keep the source's)")
    seed: int = Field(0, description="seed of the patient split")
    # chexpert / synthetic
    labels: Union[str, list[str], None] = Field(None, description="class subset or a named selection (chexpert5)")
    views: Optional[list[str]] = Field(None, description="CheXpert views: frontal, lateral or both")
    ap_pa: Optional[list[str]] = Field(None, description="CheXpert frontal projections kept: AP, PA")
    official_split: bool = Field(True, description="keep the source's own train/valid split",
                                 json_schema_extra={"off_flag": "--no-official-split"})
    check_files: bool = Field(True, description="check that image files exist (chexpert, synthetic, nih, csv)")
    # kermany / csv
    classes: Union[int, list[str], None] = Field(None, description="kermany: 2 or 3; csv: class names in order")
    check_duplicates: bool = Field(True, description="kermany: hash files to list byte-identical groups")
    path_col: str = Field("path", description="csv: the image path column")
    label_cols: Optional[list[str]] = Field(None, description="csv, dicom: label columns (comma-separated)")
    class_col: Optional[str] = Field(None, description="csv: one column of class names (multi-class)")
    patient_col: Optional[str] = Field(None, description="csv: patient id column")
    study_col: Optional[str] = Field(None, description="csv: study id column")
    view_col: Optional[str] = Field(None, description="csv: view column")
    split_col: Optional[str] = Field(None, description="csv: split column (train/valid/test)")
    task: Literal["multilabel", "multiclass"] = Field("multilabel", description="csv, dicom: multilabel | multiclass")
    recursive: bool = Field(True, description="folder: look in subfolders")
    # nih: where the files are when they are not in the release's own layout under root
    csv: Optional[str] = Field(None, description="nih: the Data_Entry_2017 CSV (none: found under root)")
    images_dir: Optional[str] = Field(None, description="nih: the folder of the PNGs (none: found under root)")
    train_val_list: Union[str, bool, None] = Field(
        None, description="nih: train_val_list.txt (none: under root if present; false: ignore it)")
    test_list: Union[str, bool, None] = Field(
        None, description="nih: test_list.txt, the official test split (none: under root if present; false: ignore)")
    bbox_csv: Union[str, bool, None] = Field(None, description="nih: BBox_List_2017.csv (none: under root if present)")
    # dicom
    labels_csv: Optional[str] = Field(None, description="dicom: CSV of labels joined on join_on")
    join_on: Literal["SOPInstanceUID", "AccessionNumber"] = Field(
        "SOPInstanceUID", description="dicom: the labels CSV's key (AccessionNumber: one row per study)")
    salt: Optional[str] = Field(None, description="dicom: salt for hashing PatientID (prefer $CXRRAY_PATIENT_SALT)")
    check_pixels: bool = Field(False, description="dicom: decode every file's pixels to find unreadable ones")
    # the leakage check (splits.check_leakage), run whenever rows have a split
    leakage_check: bool = Field(True, description="check that no patient or identical image spans splits")
    hash_images: bool = Field(True, description="compare image contents (sha1) in the leakage check",
                              json_schema_extra={"off_flag": "--no-hash"})
    on_leakage: Literal["warn", "refuse"] = Field("warn", description="leakage found: warn | refuse (exit 2)")

    _split = field_validator("split", mode="before")(lambda v: split_commas(v))
    _lists = field_validator("views", "ap_pa", "label_cols", mode="before")(
        lambda v: [v] if isinstance(v, str) and "," not in v else split_commas(v))
    # Keys of older releases, refused with where they went (schema._problem).
    moved_keys: ClassVar[dict[str, str]] = {"uncertainty": MOVED_UNCERTAINTY.removeprefix("uncertainty: ")}

    @field_validator("split")
    @classmethod
    def _fractions(cls, v):
        return check_fractions(v)

    @model_validator(mode="after")
    def _applies(self):
        taken = LOADER_OPTIONS[self.source]
        fields = type(self).__pydantic_fields__
        stray = [n for n in {o for opts in LOADER_OPTIONS.values() for o in opts}
                 if n not in taken and getattr(self, n) != fields[n].get_default(call_default_factory=True)]
        if stray:
            raise ValueError(f"{', '.join(sorted(stray))}: not an option of source {self.source!r} "
                             f"(its options: {', '.join(taken)})")
        if self.source == "kermany" and self.classes not in (None, 2, 3):
            raise ValueError(f"classes: {self.classes!r} is not one of 2, 3 (Kermany)")
        return self

    def loader_options(self) -> dict[str, Any]:
        """The keyword arguments of this source's adapter: the options set away from their defaults."""
        fields = type(self).__pydantic_fields__
        out = {n: getattr(self, n) for n in LOADER_OPTIONS[self.source]
               if getattr(self, n) != fields[n].get_default(call_default_factory=True)}
        return out


@schema
class TrainConfig:
    # What to train on
    manifest: str = Field("runs/manifest.parquet", description="manifest with a `split` column; built first from "
                                                              "source/root when it does not exist")
    source: Optional[SourceName] = Field(None, description="builds the manifest: " + " | ".join(SOURCES))
    root: Optional[str] = Field(None, description="dataset root the manifest is built from")
    source_options: dict[str, Any] = Field(default_factory=dict, description="manifest options (`cxrray manifest "
                                           "--help`), e.g. {classes: 3} for kermany, {views: [frontal]}")
    uncertainty: Optional[UncertaintySpec] = Field(None, description="training policy for uncertain (-1) and "
                                                   "blank labels: {default: U-Zeros, overrides: {Edema: U-Ones}, "
                                                   "blank: zero}; none: U-Zeros, blank zero")
    val_labels: Literal["certain", "blank_negative", "train"] = Field(
        "certain", description="validation AUROC and thresholds on: certain (uncertain and blank masked) | "
                               "blank_negative (uncertain masked) | train (the training policy)")
    split: Fractions = Field((0.8, 0.1, 0.1), description="train, valid, test fractions by patient (sum to 1)")
    labels: Union[list[str], str, None] = Field(None, description="subset/named selection of the manifest's labels")
    data_format: Literal["raw", "shards"] = Field("raw", description="raw: decode files each epoch; shards: "
                                                  "`cxrray prepare` Parquet shards")
    shards_dir: Optional[str] = Field(None, description="the shards of data_format=shards")

    # Model
    model: ModelName = Field("densenet121", description=" | ".join(MODELS))
    pretrained: Optional[str] = Field(None, description="none | imagenet (torch hub cache) | a weights file")
    freeze_backbone: bool = Field(False, description="transfer learning: train the head only")
    init_from: Optional[str] = Field(None, description="start from this artifact's weights (dir, URI or "
                                                       "models:/...; same model and classes): a two-stage recipe")
    image_size: int = Field(224, ge=16, le=2048, description="input side in px (16-2048)")
    channels: Literal[1, 3] = Field(3, description="3: replicate grey; 1: adapt the first conv")

    # Optimisation
    epochs: int = Field(10, ge=1, description="epochs (>= 1)")
    batch_size: int = Field(32, ge=1, description="images per worker per step (>= 1)")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (> 0)")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay (>= 0)")
    loss: Literal["bce", "weighted_bce", "focal", "ce", "aucm"] = Field(
        "bce", description="bce | weighted_bce | focal | ce (multi-class) | aucm (AUC-margin; stage 2 after "
                           "init_from a bce/ce run)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="label smoothing eps in [0, 0.5): softer "
                                   "cross-entropy targets (bce: 1 -> 1-eps/2, 0 -> eps/2); not with aucm")
    upsample: bool = Field(False, description="repeat rare-class positives instead of (or as well as) weighting")
    scheduler: Literal["cosine", "plateau", "none"] = Field("cosine", description="cosine | plateau | none")
    warmup_epochs: int = Field(0, ge=0, description="linear warm-up epochs of the cosine schedule")
    grad_clip: Optional[float] = Field(1.0, gt=0, description="gradient norm clip (none: off)")
    precision: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto", description="auto (bf16 on GPUs that have it, else fp16) | bf16 | fp16 | off; CPU is always fp32")
    early_stopping_patience: int = Field(0, ge=0, description="epochs without val mean AUROC gain; 0 = off")
    max_steps_per_epoch: Optional[int] = Field(None, ge=1, description="cap, for smoke runs")
    seed: int = Field(0, description="seed of the split, shuffling and initialisation")
    seeds: int = Field(1, ge=1, le=16, description="train this many models (seeds seed, seed+1, ...) and publish "
                                                   "their ensemble as artifacts/best (1: one model)")
    tta: bool = Field(False, description="test-time augmentation in the published artifact (identity, +-5 deg "
                                         "rotations, 1.05 zoom; thresholds chosen with it on valid)")

    # Augmentation
    aug_scale: tuple[float, float] = Field((0.85, 1.0), description="random resized crop area range, in (0, 1]")
    aug_rotation: float = Field(7.0, ge=0, le=180, description="max rotation in degrees")
    aug_brightness: float = Field(0.1, ge=0, le=1, description="brightness jitter")
    aug_contrast: float = Field(0.1, ge=0, le=1, description="contrast jitter")
    hflip: bool = Field(False, description="horizontal flips; they mirror the anatomy (heart side), so off")

    # Ray
    run_name: str = Field("cxrray", min_length=1, description="the run's folder under storage_path; re-running "
                                                              "the same name resumes")
    storage_path: str = Field("runs", description="run storage: a local path, NFS mount or s3://...")
    num_workers: int = Field(2, ge=1, description="TorchTrainer workers")
    use_gpu: Union[bool, Literal["auto"]] = Field("auto", description="true | false | auto (when the cluster has GPUs)")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs (and torch threads) per worker")
    max_failures: int = Field(2, ge=0, description="worker failures to restart from the last checkpoint")
    # PACK (Ray's default) fills one node first; SPREAD/STRICT_SPREAD put workers on different nodes.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="PACK | SPREAD | STRICT_PACK | STRICT_SPREAD")
    ray_address: Optional[str] = Field(None, description="cluster to join (default: RAY_ADDRESS or a local one)")

    # Experiment tracking (MLflow, cxrray/tracking.py): params, per-epoch metrics, plots and the
    # best artifact. The default store needs no server: sqlite:///<storage_path>/mlflow.db with
    # artifacts in <storage_path>/mlruns. SQLite cannot live on an object store, so with an
    # s3://... storage_path tracking is off unless tracking_uri (or MLFLOW_TRACKING_URI) is set.
    tracking: bool = Field(True, description="log to MLflow")
    tracking_uri: Optional[str] = Field(None, description="http://mlflow:5000, sqlite:////shared/mlflow.db, ...; "
                                                          "beats MLFLOW_TRACKING_URI")
    experiment: str = Field("cxrray", description="the MLflow experiment's name")

    _split = field_validator("split", mode="before")(lambda v: split_commas(v))
    _unc = field_validator("uncertainty", mode="before")(lambda v: _uncertainty(v))

    @field_validator("split")
    @classmethod
    def _fractions(cls, v):
        return check_fractions(v)

    @field_validator("run_name")
    @classmethod
    def _one_folder(cls, v):
        # A name, not a path: "../x" put a whole run outside storage_path.
        if "/" in v or "\\" in v or v in (".", ".."):
            raise ValueError("not a folder name: no '/', and not '.' or '..'")
        return v

    @field_validator("aug_scale")
    @classmethod
    def _scale(cls, v):
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError("needs 0 < low <= high <= 1")
        return v

    @model_validator(mode="after")
    def _smoothing_has_targets(self):
        if self.loss == "aucm" and self.label_smoothing:
            raise ValueError("label_smoothing does not apply to loss 'aucm' (a margin between score means, not "
                             "per-image targets); set label_smoothing=0")
        return self

    @model_validator(mode="after")
    def _manifest_options(self):
        # The manifest this run may build is checked now, not after Ray has started.
        if self.source:
            self.manifest_config()
        elif self.source_options:
            raise ValueError("source_options configure the manifest built from `source`: set source")
        return self

    def manifest_config(self) -> ManifestConfig:
        """The manifest this run builds when `manifest` does not exist yet."""
        if "uncertainty" in self.source_options:
            raise ValueError("source_options: " + MOVED_UNCERTAINTY)
        reserved = sorted({"source", "root", "out", "split", "seed"} & set(self.source_options))
        if reserved:
            raise ValueError(f"source_options: {', '.join(reserved)} are keys of the train config itself")
        try:
            return ManifestConfig(source=self.source, root=self.root or "", out=self.manifest, split=self.split,
                                  seed=self.seed, **self.source_options)
        except Exception as e:  # a ValidationError: name where the bad value sits
            from pydantic import ValidationError

            from cxrray.schema import one_line

            if isinstance(e, ValidationError):
                raise ValueError("source_options: " + one_line(e, ManifestConfig)) from None
            raise

    def uncertainty_policy(self):
        """The training policy (cxrray.labels.UncertaintyConfig): U-Zeros, blank zero unless set."""
        from cxrray.labels import UncertaintyConfig

        return self.uncertainty.to_policy() if self.uncertainty is not None else UncertaintyConfig()

    def resolved_storage(self) -> str:
        """An absolute local path, or the URI as given: Ray Train takes `s3://...` unchanged."""
        return storage.normalize(self.storage_path)

    @property
    def run_dir(self) -> str:
        return storage.join(self.resolved_storage(), self.run_name)


__all__ = ["ConfigError", "LOADER_OPTIONS", "LOSSES", "MODELS", "ManifestConfig", "SOURCES", "TrainConfig",
           "UncertaintySpec", "build", "load_config", "parse_overrides", "save_config", "to_dict"]
