"""JPEG batches decoded and resized on the GPU (nvJPEG via torchvision), with a CPU fallback.

`decode_resized_batch(datas, pre, device=...)` gives the same contract as calling
`transforms.decode_resized` on each item: uint8 [N, 1, S, S] model input, one entry per input.
On a CUDA device, baseline/extended 8-bit JPEGs go to `torchvision.io.decode_jpeg(..., device=
"cuda")` in one batched call (luma only), then an antialiased bilinear resize
(`interpolate(antialias=True)`, Pillow's filter) on the GPU. Everything else (PNG, DICOM,
progressive or 12-bit JPEG, a batch the GPU decoder refuses, no CUDA) goes through
`transforms.decode_resized` on the CPU, item by item, so a CPU-only machine gets exactly the
CPU path's bytes. The GPU path does not reduce in the DCT domain and rounds differently from
Pillow: it is within the quality bar of the CPU path, not byte-identical (see
benchmarks/results/decode.md), so use it for scoring and serving only where the model was
validated on it, or for training and scoring alike.
"""
from __future__ import annotations

import logging
import struct
from typing import Sequence

import numpy as np

from cxrray.imaging import DEFAULT_MAX_PIXELS, ImageError, sniff_format
from cxrray.transforms import Preprocess, decode_resized

log = logging.getLogger(__name__)

_GPU_SOF = (0xC0, 0xC1)  # baseline, extended Huffman: what nvJPEG decodes in its GPU/hybrid backends


def jpeg_frame(data: bytes) -> tuple[int, int, int, int] | None:
    """(SOF marker, precision, height, width) of a JPEG from its header, or None if not found."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 9 > len(data):
                return None
            precision, height, width = struct.unpack_from(">BHH", data, pos + 4)
            return marker, precision, height, width
        pos += 2 + length
    return None


def gpu_decodable(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> bool:
    """True for an 8-bit baseline/extended JPEG within the pixel cap: nvJPEG's batched path."""
    if sniff_format(data) != "jpeg":
        return False
    frame = jpeg_frame(data)
    return (frame is not None and frame[0] in _GPU_SOF and frame[1] == 8
            and 0 < frame[2] * frame[3] <= max_pixels)


def resize_tensor(img, size: int):
    """uint8 [1, H, W] tensor -> uint8 [1, S, S] on its device: antialiased bilinear, rounded."""
    import torch

    x = img.unsqueeze(0).float()
    if tuple(x.shape[-2:]) != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                            align_corners=False)
    return x.add_(0.5).clamp_(0, 255).to(torch.uint8)[0]


def _torch_decode(datas: list[bytes], device: str) -> list:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    return decode_jpeg(tensors, mode=ImageReadMode.GRAY, device=device)


def decode_resized_batch(datas: Sequence[bytes], pre: Preprocess, *, device: str | None = None,
                         sources: Sequence[str] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                         use_torch: bool | None = None) -> list[np.ndarray | ImageError]:
    """Per input: uint8 [1, S, S], or the ImageError that says why it cannot be decoded.

    device: "cuda" (or None: CUDA when available) decodes eligible JPEGs on the GPU; "cpu" keeps
    the CPU path. use_torch=True forces torchvision's decoder and resize even on the CPU (tests
    check the GPU path's arithmetic on machines without one). A list-shaped front to
    `decode_jpegs` (what the Predictor calls): the same eligibility and the same fallback.
    """
    sources = list(sources) if sources is not None else [f"<bytes {i}>" for i in range(len(datas))]
    on_gpu = device == "cuda" or (device is None and _cuda())
    if use_torch is None:
        use_torch = on_gpu
    blobs = {i: bytes(d) for i, d in enumerate(datas)}
    on_device = decode_jpegs(blobs, pre.size, "cuda" if on_gpu else "cpu", max_pixels) if use_torch else {}
    out: list[np.ndarray | ImageError] = []
    for i, data in blobs.items():
        if i in on_device:
            out.append(on_device[i][0])
            continue
        try:
            out.append(decode_resized(data, pre, source=sources[i], max_pixels=max_pixels)[0])
        except ImageError as e:
            out.append(e)
    return out


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def decode_jpegs(datas: dict[int, bytes], size: int, device: str,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[int, tuple[np.ndarray, tuple[int, int]]]:
    """The JPEGs among `datas` ({row: bytes}) that `device` decodes itself, as {row: (uint8
    [1, S, S], (H, W) of the file)}. Rows left out (PNG, DICOM, progressive or 12-bit JPEG, a
    stream the decoder refuses) are the caller's to decode on the CPU path, which also names
    the error of a broken file. One batched call; if it fails, each image is tried alone so that
    one bad stream costs only itself."""
    frames = {i: jpeg_frame(d) for i, d in datas.items() if gpu_decodable(d, max_pixels)}
    if not frames:
        return {}
    rows = list(frames)
    out: dict[int, tuple[np.ndarray, tuple[int, int]]] = {}
    try:
        images = _torch_decode([datas[i] for i in rows], device)
        pairs = list(zip(rows, images))
    except (RuntimeError, ValueError) as e:
        log.debug("batched JPEG decode on %s failed (%s): one by one", device, e)
        pairs = []
        for i in rows:
            try:
                pairs.append((i, _torch_decode([datas[i]], device)[0]))
            except (RuntimeError, ValueError):
                continue  # the CPU path decodes it, or says why it cannot
    for i, img in pairs:
        _, _, height, width = frames[i]  # type: ignore[misc]
        out[i] = (resize_tensor(img, size).cpu().numpy(), (height, width))
    return out


def jpeg_device_for(decoder: str, model_device: str) -> str | None:
    """Where a consumer on `model_device` decodes its JPEGs: None for the CPU path (Pillow).
    "auto": the GPU when the model is on one; "pil": always the CPU path; "nvjpeg": torchvision's
    decoder on the model's device (on a CPU: torchvision's CPU decoder with the GPU path's resize,
    which is how machines without a GPU test that arithmetic)."""
    if decoder not in ("auto", "pil", "nvjpeg"):
        raise ValueError(f"decoder must be auto, pil or nvjpeg, got {decoder!r}")
    if decoder == "pil" or (decoder == "auto" and not model_device.startswith("cuda")):
        return None
    return model_device
