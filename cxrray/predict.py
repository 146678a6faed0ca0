"""The one Predictor: load an artifact, apply its own preprocessing, run the model.

Batch scoring uses it as a Ray Data actor (`map_batches(Predictor, ...)`), Serve wraps it in a
deployment. Decoding is a separate, pure step (`decode_batch`) so a pipeline can run it on
CPU tasks while GPU actors only do forward passes, or, with the model on a GPU, in the actor
itself: baseline JPEGs are then decoded and resized on the GPU in one batch (nvJPEG,
`cxrray.gpu_decode`), everything else on the CPU path.
"""
from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from cxrray.artifact import load_artifact
from cxrray.gpu_decode import decode_jpegs, jpeg_device_for
from cxrray.heads import logits_to_probs
from cxrray.imaging import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, DecodedImage, ImageError, read_bytes
from cxrray.labels import MULTICLASS
from cxrray.qa import IDENTITY_FIELDS, ImageQA, assess, enforce
from cxrray.transforms import Preprocess, decode_resized, load_resized

log = logging.getLogger(__name__)


def reserved_cpus(default: int | None = None) -> int:
    """CPUs this Ray task/actor reserved (Ray starts workers with OMP_NUM_THREADS=1, so torch
    would otherwise use one thread); outside Ray, the machine's cores."""
    try:
        import ray

        if ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if cpus:
                return max(1, int(cpus))
    except Exception:  # noqa: BLE001 - outside a Ray worker there is no context; fall through
        pass
    return default or os.cpu_count() or 1


def decode_one(path: str, pre: Preprocess, *, max_pixels: int, max_bytes: int,
               strict: bool = False, data: bytes | None = None) -> tuple[np.ndarray, str | None, ImageQA]:
    """(uint8 [1,S,S], None, QA) or (zeros, "reason: detail", QA) for an unreadable file (or,
    with strict, a DICOM that is not a chest radiograph). `data`: the file's bytes, if read."""
    qa = ImageQA()
    try:
        # transforms.load_resized: the decode training and Serve use too (one definition, no skew);
        # `decoded.shape` is the file's own size, which the QA's low_resolution check reads.
        if data is None:
            image, decoded = load_resized(path, pre, max_pixels=max_pixels, max_bytes=max_bytes)
        else:
            image, decoded = decode_resized(data, pre, source=path, max_pixels=max_pixels)
        qa = assess(decoded)
        enforce(qa, path, strict=strict)
        return image, None, qa
    except ImageError as e:
        return np.zeros((1, pre.size, pre.size), np.uint8), f"{e.reason}: {e}", qa
    except Exception as e:  # noqa: BLE001 - any other failure on one file must not kill the batch
        return np.zeros((1, pre.size, pre.size), np.uint8), f"corrupt: {path}: {type(e).__name__}: {e}", qa


def decode_batch(
    batch: dict[str, np.ndarray],
    pre: Preprocess,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    strict: bool = False,
    jpeg_device: str | None = None,
) -> dict[str, np.ndarray]:
    """Adds `image` (uint8 [N,1,S,S]), `error` (None or reason), the DICOM identity columns and
    `qa_warnings` (comma-joined: ragged lists would be pickled between Ray Data stages).
    `jpeg_device` ("cuda"): decode the batch's baseline JPEGs there in one call (nvJPEG); every
    other file, and any JPEG the device refuses, takes the CPU path."""
    paths = [str(p) for p in batch["path"]]
    if jpeg_device is None:
        decoded = [decode_one(p, pre, max_pixels=max_pixels, max_bytes=max_bytes, strict=strict) for p in paths]
    else:
        decoded = _decode_with_device(paths, pre, jpeg_device, max_pixels=max_pixels, max_bytes=max_bytes,
                                      strict=strict)
    out = dict(batch)
    out["image"] = np.stack([d[0] for d in decoded]) if decoded else np.zeros((0, 1, pre.size, pre.size), np.uint8)
    out["error"] = np.array([d[1] for d in decoded], dtype=object)
    for name in IDENTITY_FIELDS:
        out[name] = np.array([d[2].identity[name] for d in decoded], dtype=object)
    out["qa_warnings"] = np.array([",".join(d[2].warnings) for d in decoded], dtype=object)
    return out


def _decode_with_device(paths: list[str], pre: Preprocess, device: str, *, max_pixels: int, max_bytes: int,
                        strict: bool) -> list[tuple[np.ndarray, str | None, ImageQA]]:
    """decode_one for each path, with the JPEGs decoded on `device` in one batch. Each file is
    read once; a file that cannot be read is left to decode_one, which names the error."""
    datas: dict[int, bytes] = {}
    for i, p in enumerate(paths):
        try:
            datas[i] = read_bytes(p, max_bytes=max_bytes)
        except (ImageError, OSError):
            continue
    on_device = decode_jpegs(datas, pre.size, device, max_pixels)
    out = []
    for i, p in enumerate(paths):
        if i in on_device:
            image, shape = on_device[i]
            # A JPEG carries no DICOM identity: only the file's own size feeds the QA.
            out.append((image, None, assess(DecodedImage(np.zeros((0, 0), np.float32), "jpeg", shape=shape))))
        else:
            out.append(decode_one(p, pre, max_pixels=max_pixels, max_bytes=max_bytes, strict=strict,
                                  data=datas.get(i)))
    return out


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Predictor:
    """Artifact -> probabilities. Callable on Ray Data batches (columns `path` or `image`)."""

    def __init__(
        self,
        artifact: str | Path,
        *,
        device: str = "auto",
        num_threads: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        strict: bool = False,
        decoder: str = "auto",
    ):
        self.device = pick_device(device)
        # Where JPEGs are decoded (gpu_decode.jpeg_device_for): on a GPU model, nvJPEG in batches.
        self.jpeg_device = jpeg_device_for(decoder, str(self.device))
        self.strict = strict  # not_radiograph / not_chest DICOMs become errors, not warnings
        if self.device.type == "cpu":
            torch.set_num_threads(num_threads or reserved_cpus())
        self.model, self.meta = load_artifact(artifact, self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.prob_columns = self.label_space.prob_columns
        log.info("Predictor %s (%s) on %s, %d threads, JPEG decode on %s", self.model_id, self.meta.architecture,
                 self.device, torch.get_num_threads(), self.jpeg_device or "cpu (Pillow)")

    @property
    def label_space(self):
        return self.meta.label_space

    @property
    def preprocess(self) -> Preprocess:
        return self.meta.preprocess

    @property
    def thresholds(self) -> np.ndarray:
        return np.asarray(self.meta.thresholds, dtype=np.float32)

    @property
    def model_id(self) -> str:
        return self.meta.model_id

    def _autocast(self):
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return nullcontext()

    def model_input(self, images: np.ndarray) -> torch.Tensor:
        # Ray hands batches over as read-only views of the object store, which torch.from_numpy
        # warns about on every batch; np.require copies only such an array (50 KB an image).
        images = np.require(images, requirements=("C_CONTIGUOUS", "WRITEABLE"))
        x = torch.from_numpy(images).to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @torch.inference_mode()
    def predict_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N,1,S,S] -> float32 probabilities [N,K]."""
        if len(images) == 0:
            return np.zeros((0, self.label_space.num_classes), np.float32)
        with self._autocast():
            logits = self.model(self.model_input(images))
        return logits_to_probs(logits, self.label_space).float().cpu().numpy()

    def prepare_bytes(self, data: bytes, source: str = "<upload>") -> np.ndarray:
        """Image bytes -> uint8 [1,S,S]; raises imaging.ImageError for a bad file."""
        return self.prepare_bytes_info(data, source)[0]

    def prepare_bytes_info(self, data: bytes, source: str = "<upload>", *,
                           strict: bool | None = None) -> tuple[np.ndarray, ImageQA]:
        """Image bytes -> (uint8 [1,S,S], identity and QA warnings); raises imaging.ImageError
        for a bad file, and qa.NotAChestRadiograph in strict mode."""
        on_device = decode_jpegs({0: data}, self.preprocess.size, self.jpeg_device, self.max_pixels) \
            if self.jpeg_device else {}
        if on_device:
            image, shape = on_device[0]
            qa = assess(DecodedImage(np.zeros((0, 0), np.float32), "jpeg", shape=shape))
        else:
            image, decoded = decode_resized(data, self.preprocess, source=source, max_pixels=self.max_pixels)
            qa = assess(decoded)
        enforce(qa, source, strict=self.strict if strict is None else strict)
        return image, qa

    def decisions(self, probs: np.ndarray) -> np.ndarray:
        """Boolean [N,K]: multi-label uses the per-class thresholds, multi-class the arg max."""
        if self.label_space.task == MULTICLASS:
            return probs == probs.max(axis=1, keepdims=True)
        return probs >= self.thresholds[None, :]

    def describe(self, probs: np.ndarray) -> list[dict[str, Any]]:
        """Per-image JSON-able results: class -> probability, threshold, decision."""
        names = self.label_space.names
        dec = self.decisions(probs)
        return [
            {
                "model_id": self.model_id,
                "classes": {
                    n: {"probability": float(p[k]), "threshold": float(self.thresholds[k]), "positive": bool(d[k])}
                    for k, n in enumerate(names)
                },
                "positive": [n for k, n in enumerate(names) if d[k]],
            }
            for p, d in zip(probs, dec)
        ]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data batch -> prediction rows (the predictions-Parquet contract)."""
        if "image" not in batch:
            batch = decode_batch(batch, self.preprocess, self.max_pixels, self.max_bytes, self.strict,
                                 jpeg_device=self.jpeg_device)
        # Ray Data stores an all-None `error` column as Arrow null, which comes back as NaN floats.
        errors = np.array([None if _no_error(e) else e for e in batch.get("error", [None] * len(batch["image"]))],
                          dtype=object)
        good = np.array([e is None for e in errors], dtype=bool)
        n = len(errors)
        probs = np.full((n, self.label_space.num_classes), np.nan, np.float32)
        if good.any():
            probs[good] = self.predict_images(np.asarray(batch["image"])[good])
        dec = self.decisions(np.nan_to_num(probs, nan=-1.0))
        names = self.label_space.names
        out: dict[str, np.ndarray] = {
            "image_id": np.asarray(batch.get("image_id", batch["path"]), dtype=object),
            "path": np.asarray(batch["path"], dtype=object),
        }
        for k, col in enumerate(self.prob_columns):
            out[col] = probs[:, k]
        out["positive"] = np.array(
            [[names[k] for k in np.flatnonzero(d)] if ok else None for d, ok in zip(dec, good)], dtype=object
        )
        out["model_id"] = np.array([self.model_id] * n, dtype=object)
        out["error"] = errors
        for name in IDENTITY_FIELDS:
            out[name] = np.array([None if _no_error(v) else v for v in batch.get(name, [None] * n)], dtype=object)
        out["warnings"] = np.array([[w for w in str(v).split(",") if w] if not _no_error(v) else []
                                    for v in batch.get("qa_warnings", [None] * n)], dtype=object)
        return out


def _no_error(e: Any) -> bool:
    return e is None or (isinstance(e, (float, np.floating)) and np.isnan(e))


def predict_paths(predictor: Predictor, paths: Sequence[str], batch_size: int = 32) -> dict[str, np.ndarray]:
    """Plain-Python scoring of a list of files (no Ray): the reference the Ray job must match."""
    parts = [predictor({"path": np.asarray(paths[i : i + batch_size], dtype=object)})
             for i in range(0, len(paths), batch_size)]
    if not parts:
        return predictor({"path": np.asarray([], dtype=object)})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
