"""Decode-and-resize benchmark (not a test): images/s on one core, and the quality of the fast path.

Side by side in one run, on the same bytes held in memory (no disk in the timing):

  previous   the path before the fast decode: full-resolution decode to float32
             (`imaging.decode_bytes`), then Pillow 'F' bilinear resize, rounded (a copy below)
  new        `transforms.decode_resized`: JPEG draft to >= 2x size, integer-mode resize
  plain_pil  the limit: Image.open, draft('L', 2x) for JPEG, convert('L'), resize(reducing_gap=2)
  torch_cpu  `gpu_decode.decode_resized_batch(use_torch=True)` on the CPU: the GPU path's
             arithmetic (torchvision decode_jpeg, interpolate antialias) without a GPU
  nvjpeg     the same on CUDA, batched (only when torch.cuda.is_available())

Sets: NIH 1024-px PNGs, Kermany 224-px JPEGs, film-sized JPEGs (synthetic radiographs at
2,048 px and real NIH pictures upscaled to 2,500 px, JPEG quality 90), 16-bit PNGs (NIH x 256
plus low bits) and 12-bit DICOM with Rescale and a window (NIH pixels). Quality: PSNR and mean
absolute error of each method's uint8 output against `previous`. Timing: one untimed warm-up,
then rounds in which the methods take turns over the whole set; medians; the 1-min load average
is recorded per round (the machine is shared).

    python benchmarks/bench_decode.py --rounds 5 --out benchmarks/results/decode.json
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.append(str(REPO / "tests"))  # the tests' DICOM builder

from _report import environment, publish  # noqa: E402
from cxrray.gpu_decode import decode_resized_batch  # noqa: E402
from cxrray.imaging import decode_bytes  # noqa: E402
from cxrray.transforms import Preprocess, decode_resized  # noqa: E402
from dicom_files import make_dicom  # noqa: E402


def previous(data: bytes, size: int) -> np.ndarray:
    """The model input as cxrray built it before the fast path (transforms.resize in 'F')."""
    img = decode_bytes(data)
    if img.shape != (size, size):
        img = np.asarray(Image.fromarray(img, mode="F").resize((size, size), Image.BILINEAR), np.float32)
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def plain_pil(data: bytes, size: int) -> np.ndarray:
    im = Image.open(io.BytesIO(data))
    if im.format == "JPEG":
        im.draft("L", (2 * size, 2 * size))
    return np.asarray(im.convert("L").resize((size, size), Image.BILINEAR, reducing_gap=2))


def jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def dicom(stored: np.ndarray) -> bytes:
    """12-bit MONOCHROME2 DX with Rescale Slope/Intercept and a window, uncompressed."""
    return make_dicom(stored.astype("<u2"), Modality="DX", BodyPartExamined="CHEST", ViewPosition="PA",
                      BitsStored=12, HighBit=11, RescaleSlope=1, RescaleIntercept=-1024,
                      WindowCenter=1000, WindowWidth=3000)


def build_sets(args: argparse.Namespace) -> dict[str, list[bytes]]:
    from cxrray.sources.synthetic import render_study

    nih = sorted(Path(args.nih).glob("*.png"))
    rgba = [p for p in nih if Image.open(p).mode == "RGBA"]
    nih = (rgba + [p for p in nih if p not in rgba])[: args.n]  # the RGBA quirk is always in
    kermany = sorted(Path(args.kermany).glob("*/*.jpeg"))[:: max(1, len(list(Path(args.kermany).glob("*/*.jpeg"))) // (4 * args.n))]
    grey = [np.asarray(Image.open(p).convert("L")) for p in nih[: args.n // 2]]
    rng = np.random.default_rng(0)
    sets = {
        "nih_png_1024": [p.read_bytes() for p in nih],
        "kermany_jpeg_224": [p.read_bytes() for p in kermany[: 4 * args.n]],
        "large_jpeg_synthetic_2048": [jpeg(render_study(rng, {}, 2048)[0]) for _ in range(args.n // 2)],
        "large_jpeg_nih_2500": [jpeg(np.asarray(Image.fromarray(g).resize((2500, 2500), Image.BICUBIC)))
                                for g in grey],
        "png16_1024": [png((g.astype(np.uint16) * 256 + rng.integers(0, 256, g.shape)).astype(np.uint16))
                       for g in grey],
        "dicom12_1024": [dicom(g.astype(np.uint16) * 16 + rng.integers(0, 16, g.shape).astype(np.uint16))
                         for g in grey],
    }
    return sets


def quality(ref: list[np.ndarray], out: list[np.ndarray]) -> dict:
    mae = [float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean()) for a, b in zip(ref, out)]
    mse = [float(((a.astype(np.float64) - b) ** 2).mean()) for a, b in zip(ref, out)]
    psnr = [99.0 if m == 0 else 10 * np.log10(255.0 ** 2 / m) for m in mse]
    return {"psnr_min_db": min(psnr), "psnr_median_db": statistics.median(psnr), "mae_max": max(mae),
            "mae_mean": statistics.mean(mae), "max_abs": int(max(np.abs(a.astype(int) - b).max() for a, b in zip(ref, out)))}


def methods(size: int, fmt_is_pil: bool, cuda: bool) -> dict:
    pre = Preprocess(size=size, channels=1)
    m = {"previous": lambda ds: [previous(d, size) for d in ds],
         "new": lambda ds: [decode_resized(d, pre)[0][0] for d in ds]}
    if fmt_is_pil:
        m["plain_pil"] = lambda ds: [plain_pil(d, size) for d in ds]
    m["torch_cpu"] = lambda ds: [x[0] for x in decode_resized_batch(ds, pre, device="cpu", use_torch=True)]
    if cuda:
        m["nvjpeg"] = lambda ds: [x[0] for x in decode_resized_batch(ds, pre, device="cuda")]
    return m


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nih", default=str(REPO.parent / "shared/data/nih14/images"))
    p.add_argument("--kermany", default=str(REPO.parent / "shared/data/kermany/chest_xray/test"))
    p.add_argument("--n", type=int, default=60, help="images per set (Kermany: 4x, synthetic sets: n/2)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # one core for every method
    cuda = torch.cuda.is_available()
    sets = build_sets(args)
    results = {}
    for name, datas in sets.items():
        ms = methods(args.size, not name.startswith("dicom"), cuda)
        ref = ms["previous"](datas)
        q = {k: quality(ref, f(datas)) for k, f in ms.items() if k != "previous"}
        times: dict[str, list[float]] = {k: [] for k in ms}
        loads = []
        for r in range(args.rounds + 1):
            for k, f in ms.items():
                t0 = time.perf_counter()
                f(datas)
                if r:
                    times[k].append(len(datas) / (time.perf_counter() - t0))
            loads.append(os.getloadavg()[0])
        med = {k: statistics.median(v) for k, v in times.items()}
        base = "plain_pil" if "plain_pil" in med else "previous"
        results[name] = {"images": len(datas), "images_per_s": med, "quality_vs_previous": q,
                         "ratio_new_vs_plain_pil": med["new"] / med["plain_pil"] if "plain_pil" in med else None,
                         "ratio_new_vs_previous": med["new"] / med["previous"],
                         "ratio_previous_vs_plain_pil": med["previous"] / med[base],
                         "runs": {k: [round(x, 1) for x in v] for k, v in times.items()},
                         "load_avg_1min": loads}
        print(name, json.dumps({k: round(v, 1) for k, v in med.items()}),
              "new/plain %.2f" % (results[name]["ratio_new_vs_plain_pil"] or float("nan")),
              "load %.1f" % statistics.median(loads), flush=True)
    import PIL

    return publish({"bench": "decode", "date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
                    **environment(pillow=PIL.__version__, torch=torch.__version__),
                    "cuda": torch.cuda.get_device_name(0) if cuda else None, "size": args.size,
                    "rounds": args.rounds, "results": results}, args.out, indent=1)


if __name__ == "__main__":
    sys.exit(main())
