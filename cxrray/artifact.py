"""The artifact: a directory with `model.pt` (state dict only) and `model.json` (everything
else). Scoring and serving load it; nothing beyond tensors is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxrray import __version__, storage
from cxrray.labels import LabelSpace
from cxrray.models import CXRModel, build_model
from cxrray.transforms import Preprocess

log = logging.getLogger(__name__)

WEIGHTS = "model.pt"
META = "model.json"


class ArtifactError(ValueError):
    """An artifact directory is missing, incomplete or from an incompatible version."""


@dataclass
class ModelMeta:
    architecture: str
    label_space: LabelSpace
    preprocess: Preprocess
    thresholds: list[float]
    gradcam_layer: str
    summary: dict[str, Any] = field(default_factory=dict)  # epochs, metrics, history, data fingerprint
    config: dict[str, Any] = field(default_factory=dict)  # the resolved training config
    model_id: str = ""
    weights_sha256: str = ""  # of model.pt: readers verify it (a torn or raced read never loads)
    code_version: str = __version__
    created: str = ""
    # An ensemble (cxrray.ensemble): how many members model.pt holds, and the TTA views they see.
    members: int = 1
    tta: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["label_space"] = self.label_space.to_dict()
        d["preprocess"] = self.preprocess.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelMeta":
        d = dict(d)
        d["label_space"] = LabelSpace.from_dict(d["label_space"])
        d["preprocess"] = Preprocess.from_dict(d["preprocess"])
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_artifact(directory: str | Path, model: nn.Module, meta: ModelMeta) -> str | Path:
    """Publish an artifact to a local folder or a URI (s3://...), never leaving a moment
    without one: `model.pt` is replaced first and `model.json` (which names the weights'
    sha256) last, each file atomically. A reader that catches the two mid-switch sees a hash
    mismatch and reads again (`read_artifact_files`); the old artifact stays readable until the
    new one is whole. Returns the artifact's local Path, or its URI."""
    with tempfile.TemporaryDirectory(prefix="cxrray-artifact-") as tmp:
        staged = write_local(Path(tmp), model, meta)
        dest = storage.normalize(directory)
        storage.upload_dir(staged, dest, last=(META,))
    return dest if storage.is_uri(dest) else Path(dest)


def write_local(directory: Path, model: nn.Module, meta: ModelMeta) -> Path:
    """model.pt + model.json into a local folder; fills meta.model_id and weights_sha256."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    torch.save(state, directory / WEIGHTS)
    digest = file_sha256(directory / WEIGHTS)
    # The id hashes the weights and the label space/preprocessing: same weights with another
    # label order must not share an id.
    h = hashlib.sha256(digest.encode())
    identity = [meta.label_space.to_dict(), meta.preprocess.to_dict(), meta.architecture]
    if meta.members > 1 or meta.tta:  # the same weights seen through other views are another model
        identity += [meta.members, list(meta.tta)]
    h.update(json.dumps(identity).encode())
    meta.model_id = h.hexdigest()[:16]
    meta.weights_sha256 = digest
    meta.created = meta.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    (directory / META).write_text(json.dumps(meta.to_dict(), indent=2, default=str))
    return directory


def _not_an_artifact(directory: str) -> ArtifactError:
    return ArtifactError(f"{directory}: not a cxrray artifact (needs {WEIGHTS} and {META}); point at a training "
                         "run's artifacts/best directory")


def from_registry(directory: str | Path) -> str | Path:
    """`models:/name/3` or `models:/name@alias` -> the registered artifact's location, resolved
    through MLflow (cxrray.tracking, MLFLOW_TRACKING_URI); any other path as it is."""
    if "models:/" not in os.fspath(directory):
        return directory
    from cxrray import tracking  # mlflow loads only for registry URIs

    uri = tracking.model_uri(directory)
    return tracking.resolve_model_uri(uri) if uri else directory


def read_meta(directory: str | Path) -> ModelMeta:
    d = storage.normalize(from_registry(directory))
    try:
        text = storage.read_text(storage.join(d, META))
    except (FileNotFoundError, NotADirectoryError):  # nothing there, or a file where the folder should be
        raise _not_an_artifact(d) from None
    if not storage.is_file(storage.join(d, WEIGHTS)):
        raise _not_an_artifact(d)
    return ModelMeta.from_dict(json.loads(text))


def check_local_weights(directory: str | Path) -> None:
    """A local artifact's model.pt against the sha256 in its model.json (a URI's is checked as
    it is downloaded, in localize): a torn copy or a replaced file is one line here, where it
    was a KeyError from torch.load in every scoring actor."""
    d = storage.normalize(from_registry(directory))
    meta = read_meta(d)
    if storage.is_uri(d) or not meta.weights_sha256:
        return
    if file_sha256(Path(d) / WEIGHTS) != meta.weights_sha256:
        raise ArtifactError(f"{d}: {WEIGHTS} does not match the sha256 in {META} (a partial copy, or a file "
                            "replaced by hand); copy the artifact again")


def cache_root() -> Path:
    return Path(os.environ.get("CXRRAY_CACHE", Path.home() / ".cache" / "cxrray")) / "artifacts"


def localize(directory: str | Path, attempts: int = 5) -> Path:
    """A local folder holding the artifact. Local paths are used in place; a URI is downloaded
    once per model_id into the cache (CXRRAY_CACHE, default ~/.cache/cxrray), so every replica
    and actor on a node after the first loads from local disk. The weights are checked against
    the sha256 in model.json, which also catches a read that raced a re-publish."""
    d = storage.normalize(from_registry(directory))
    if not storage.is_uri(d):
        return Path(d)
    for attempt in range(attempts):
        meta = read_meta(d)
        key = meta.model_id or hashlib.sha256(d.encode()).hexdigest()[:16]
        cached = cache_root() / key
        if (cached / META).exists() and (cached / WEIGHTS).exists():
            return cached
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cached.parent))
        try:
            (tmp / WEIGHTS).write_bytes(storage.read_bytes(storage.join(d, WEIGHTS)))
            if meta.weights_sha256 and file_sha256(tmp / WEIGHTS) != meta.weights_sha256:
                log.info("%s changed while it was read (attempt %d); reading it again", d, attempt + 1)
                time.sleep(0.5 * (attempt + 1))
                continue
            (tmp / META).write_text(json.dumps(meta.to_dict(), indent=2, default=str))
            try:
                os.replace(tmp, cached)  # another process may have won the race: theirs is identical
            except OSError:
                pass
            log.info("artifact %s cached at %s", d, cached)
            return cached
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    raise ArtifactError(f"{d}: its {WEIGHTS} never matched the sha256 in its {META} after {attempts} reads; "
                        "is something rewriting it?")


def load_artifact(directory: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelMeta]:
    """The model (a CXRModel, or an ensemble.Ensemble of them) in eval mode, and its meta."""
    local = localize(directory)
    meta = read_meta(local)
    model = build_model(meta.architecture, meta.label_space.num_outputs, meta.preprocess)
    if meta.members > 1 or meta.tta:
        from cxrray.ensemble import Ensemble

        model = Ensemble([model] + [build_model(meta.architecture, meta.label_space.num_outputs, meta.preprocess)
                                    for _ in range(meta.members - 1)], meta.tta or ("identity",))
    # weights_only=True: a checkpoint from elsewhere can carry no executable pickle.
    state = torch.load(local / WEIGHTS, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval(), meta
