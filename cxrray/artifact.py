"""The artifact: a directory with `model.pt` (state dict only) and `model.json` (everything
else). Scoring and serving load it; nothing beyond tensors is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxrray import __version__
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
    code_version: str = __version__
    created: str = ""

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


def save_artifact(directory: str | Path, model: nn.Module, meta: ModelMeta) -> Path:
    """Write atomically (to a temp dir, then rename) so a crash never leaves half an artifact."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    torch.save(state, tmp / WEIGHTS)
    # The id hashes the weights and the label space/preprocessing: same weights with another
    # label order must not share an id.
    h = hashlib.sha256(file_sha256(tmp / WEIGHTS).encode())
    h.update(json.dumps([meta.label_space.to_dict(), meta.preprocess.to_dict(), meta.architecture]).encode())
    meta.model_id = h.hexdigest()[:16]
    meta.created = meta.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    (tmp / META).write_text(json.dumps(meta.to_dict(), indent=2, default=str))
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)
    return directory


def read_meta(directory: str | Path) -> ModelMeta:
    directory = Path(directory)
    if not (directory / META).exists() or not (directory / WEIGHTS).exists():
        raise ArtifactError(
            f"{directory}: not a cxrray artifact (needs {WEIGHTS} and {META}); point at a training run's"
            " artifacts/best directory"
        )
    return ModelMeta.from_dict(json.loads((directory / META).read_text()))


def load_artifact(directory: str | Path, device: str | torch.device = "cpu") -> tuple[CXRModel, ModelMeta]:
    meta = read_meta(directory)
    model = build_model(meta.architecture, meta.label_space.num_outputs, meta.preprocess)
    # weights_only=True: a checkpoint from elsewhere can carry no executable pickle.
    state = torch.load(Path(directory) / WEIGHTS, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval(), meta
