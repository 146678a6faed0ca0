"""DICOM decode benchmark (not a test): images/s per transfer syntax, cxrray vs plain pydicom.

Two decoders over the same bytes held in memory, in one process, side by side:

  cxrray   `imaging.decode_bytes`: parse, checks, first frame, Modality LUT + VOI/window,
           MONOCHROME1/colour handling, float32 in [0, 1]
  pydicom  `pydicom.dcmread(BytesIO(b), force=True).pixel_array`: parse + raw pixels only
           (all frames), the baseline the ratio is taken against
  pydicom+LUT  the same plus `apply_modality_lut` + `apply_voi_lut` on the first frame: about
           the work cxrray does (shown for context; no ratio)

Cases: a synthetic chest-X-ray-sized image (--size, 12 bits stored in 16, with a rescale and a
window, like a DX export) written in every transfer syntax this install can *encode*, plus
pydicom's own test files grouped by transfer syntax (small images, real encoders' output; JPEG
Lossless SV1 is only there, since no pip-installable encoder writes it). Each round times every
case with both decoders back to back (order alternating), so machine noise hits them alike;
medians over --rounds are reported, and the ratio is cxrray / pydicom within each round.

    python benchmarks/bench_dicom.py --size 1024 --rounds 5 --out benchmarks/results/dicom.md
"""
from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import statistics
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.append(str(REPO / "tests"))  # the tests' DICOM builder

from cxrray.imaging import ImageError, decode_bytes  # noqa: E402
from dicom_files import dicom_bytes, dicom_dataset  # noqa: E402

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def chest_like(size: int, seed: int = 0) -> np.ndarray:
    """A smooth 12-bit image with texture: compresses like a radiograph, not like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    body = 2500 * np.exp(-((x - 0.5) ** 2 / 0.08 + (y - 0.55) ** 2 / 0.12))
    lungs = -900 * (np.exp(-((x - 0.32) ** 2 + (y - 0.5) ** 2) / 0.02) + np.exp(-((x - 0.68) ** 2 + (y - 0.5) ** 2) / 0.02))
    img = 600 + body + lungs + rng.normal(0, 25, (size, size))
    return np.clip(img, 0, 4095).astype(np.uint16)


def dx_dataset(arr: np.ndarray, bits_stored: int) -> Dataset:
    """A chest DX with `bits_stored` of each sample used, a rescale and a full-range window."""
    return dicom_dataset(arr, Modality="DX", ViewPosition="PA", BodyPartExamined="CHEST", BitsStored=bits_stored,
                         HighBit=bits_stored - 1, RescaleSlope=1, RescaleIntercept=0,
                         WindowCenter=2 ** (bits_stored - 1), WindowWidth=2**bits_stored)


def synthetic_cases(size: int) -> dict[str, bytes]:
    arr = chest_like(size)
    cases: dict[str, bytes] = {}
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ds = dx_dataset(arr, 12)
        ds.file_meta.TransferSyntaxUID = syntax
        cases[syntax.name] = dicom_bytes(ds)
    for syntax in (RLELossless, JPEG2000Lossless, JPEGLSLossless):
        ds = dx_dataset(arr, 12)
        try:
            ds.compress(syntax)  # pydicom's encoders: native RLE, pylibjpeg-openjpeg, pyjpegls
        except (RuntimeError, NotImplementedError, ImportError) as e:
            print(f"skip {syntax.name}: no encoder here ({str(e).splitlines()[0]})", file=sys.stderr)
            continue
        cases[syntax.name] = dicom_bytes(ds)
    # JPEG baseline is 8-bit: what many PACS exports of CR/DX look like after a lossy export.
    eight = (arr >> 4).astype(np.uint8)
    jpeg = io.BytesIO()
    Image.fromarray(eight).save(jpeg, "JPEG", quality=90)
    ds = dx_dataset(eight, 8)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([jpeg.getvalue()])
    ds["PixelData"].VR = "OB"
    cases[JPEGBaseline8Bit.name] = dicom_bytes(ds)
    return {f"synthetic {size}x{size}: {k}": v for k, v in cases.items()}


def test_file_cases() -> dict[str, list[bytes]]:
    """pydicom's test files that plain pydicom decodes, by transfer syntax."""
    groups: dict[str, list[bytes]] = defaultdict(list)
    for path in sorted(TEST_FILES.glob("*.dcm")):
        data = path.read_bytes()
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            ds.pixel_array
        except Exception:  # noqa: BLE001 - not decodable by pydicom: not part of the comparison
            continue
        groups[f"test files: {UID(ds.file_meta.TransferSyntaxUID).name}"].append(data)
    return dict(groups)


def plain_pydicom(data: bytes) -> np.ndarray:
    return pydicom.dcmread(io.BytesIO(data), force=True).pixel_array


def pydicom_lut(data: bytes) -> np.ndarray:
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    arr = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]
    if arr.ndim == 2:
        arr = apply_voi_lut(apply_modality_lut(arr, ds), ds)
    return arr


def cxrray(data: bytes) -> np.ndarray:
    return decode_bytes(data)


def rate(fn, blobs: list[bytes], min_seconds: float) -> float:
    """Images/s of fn over blobs, repeating the list until min_seconds have passed."""
    n, start = 0, time.perf_counter()
    while True:
        for b in blobs:
            fn(b)
        n += len(blobs)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return n / elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-seconds", type=float, default=1.0, help="per case, per decoder, per round")
    ap.add_argument("--out", type=Path, help="write the markdown table here")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")  # pydicom's notes on odd test files

    cases = {k: [v] for k, v in synthetic_cases(args.size).items()} | test_file_cases()
    for name, blobs in cases.items():  # warm-up, and a check that both decode every blob
        for b in blobs:
            plain_pydicom(b)
            try:
                cxrray(b)
            except ImageError as e:
                raise SystemExit(f"{name}: cxrray fails on a file pydicom decodes: {e}") from e
    rates: dict[str, dict[str, list[float]]] = {k: {"cxrray": [], "pydicom": [], "lut": [], "ratio": []} for k in cases}
    for r in range(args.rounds):
        for name, blobs in cases.items():
            order = [("cxrray", cxrray), ("pydicom", plain_pydicom), ("lut", pydicom_lut)]
            got = {label: rate(fn, blobs, args.min_seconds) for label, fn in (order if r % 2 == 0 else order[::-1])}
            for label, value in got.items():
                rates[name][label].append(value)
            rates[name]["ratio"].append(got["cxrray"] / got["pydicom"])
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    lines = [
        "| case | files | bytes/file (median) | cxrray img/s | pydicom img/s | **ratio** (cxrray / pydicom) | pydicom+LUT img/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, blobs in cases.items():
        med = {k: statistics.median(v) for k, v in rates[name].items()}
        size = int(statistics.median(len(b) for b in blobs))
        lines.append(f"| {name} | {len(blobs)} | {size:,} | {med['cxrray']:.1f} | {med['pydicom']:.1f} | **{med['ratio']:.2f}x** | {med['lut']:.1f} |")
    header = [
        f"command: `python benchmarks/bench_dicom.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"date: {datetime.date.today().isoformat()}; machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"load average at the end {os.getloadavg()[0]:.1f}; python {platform.python_version()}, "
        f"pydicom {pydicom.__version__}, numpy {np.__version__}",
        "",
    ]
    table = "\n".join(header + lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
