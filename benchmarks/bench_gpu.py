"""The GPU check, in one short run: what a lent accelerator does with cxrray's own code.

    python benchmarks/bench_gpu.py --out benchmarks/results/gpu.json      # on the GPU machine
    python benchmarks/bench_gpu.py --quick                                # smoke run on a CPU

Three measurements, medians over repeats, side by side with their CPU baselines:
1. decode: CheXpert-small-sized JPEGs (about 390x320, grey, quality 90) and film-sized ones
   (2,048 px), model input 224 px: `transforms.decode_resized` on one CPU core (Pillow, the CPU
   path) against `gpu_decode.decode_jpegs` on the device (nvJPEG, one batched call + resize).
2. training: DenseNet-121 at 224 px, bf16 autocast, channels_last, AdamW steps on device-resident
   uint8 batches (the model's own normalisation included): images/s of forward + backward + step.
3. scoring end to end: `Predictor(decoder="auto")` on JPEG bytes read from disk, batch 256:
   read + nvJPEG decode + resize + DenseNet-121 bf16 forward + thresholds, images/s; and the
   same Predictor with decoder="pil" (CPU decode in the actor) for the ratio.

The issue-14 goal is >= 5,000 img/s end to end on CheXpert-small-sized JPEGs (H100 class).
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from _report import environment, publish

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def xray_jpeg(h: int, w: int, seed: int) -> bytes:
    """A grey, film-like picture (smooth anatomy + grain), JPEG quality 90."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = 0.5 + 0.3 * np.sin(6 * x + seed) * np.cos(4 * y) + rng.normal(0, 0.04, (h, w))
    buf = io.BytesIO()
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def median_rate(fn, n_items: int, repeats: int) -> float:
    """Items per second, the median of `repeats` timed calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return n_items / statistics.median(times)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_decode(device: str, n: int, repeats: int) -> dict:
    from cxrray.gpu_decode import decode_jpegs
    from cxrray.transforms import Preprocess, decode_resized

    pre = Preprocess(size=224, channels=1)
    out = {}
    for name, (h, w) in {"chexpert_small_390x320": (390, 320), "film_2048": (2048, 1700)}.items():
        count = n if h < 1000 else max(8, n // 16)
        datas = {i: xray_jpeg(h, w, i) for i in range(count)}
        cpu = median_rate(lambda: [decode_resized(d, pre) for d in datas.values()], count, repeats)

        def on_device():
            decode_jpegs(datas, 224, device)
            sync(device)

        dev = median_rate(on_device, count, repeats)
        out[name] = {"images": count, "cpu_one_core_img_s": round(cpu, 1), f"{device}_img_s": round(dev, 1),
                     "ratio": round(dev / cpu, 2)}
    return out


def bench_train(device: str, batch: int, steps: int) -> dict:
    import torch

    from cxrray.labels import CHEXPERT_5, LabelSpace
    from cxrray.models import build_model
    from cxrray.transforms import Preprocess

    space = LabelSpace(CHEXPERT_5)
    net = build_model("densenet121", space.num_outputs, Preprocess(size=224, channels=3)).to(device)
    net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randint(0, 256, (batch, 1, 224, 224), dtype=torch.uint8, device=device)
    y = torch.randint(0, 2, (batch, space.num_outputs), device=device).float()
    loss_fn = torch.nn.BCEWithLogitsLoss()
    bf16 = device.startswith("cuda")  # the CPU smoke run stays fp32
    amp = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16)

    def step():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            with amp:
                loss = loss_fn(net(x.contiguous(memory_format=torch.channels_last)).float(), y)
            loss.backward()
            opt.step()
        sync(device)

    rate = median_rate(step, batch * steps, 3)
    return {"model": "densenet121", "size": 224, "batch": batch, "precision": "bf16" if bf16 else "fp32",
            "img_s": round(rate, 1)}


def bench_score(device: str, n: int, batch: int, repeats: int) -> dict:
    import torch

    from cxrray.artifact import ModelMeta, save_artifact
    from cxrray.labels import CHEXPERT_5, LabelSpace
    from cxrray.models import build_model, gradcam_layer_path
    from cxrray.predict import Predictor
    from cxrray.transforms import Preprocess

    space, pre = LabelSpace(CHEXPERT_5), Preprocess(size=224, channels=3)
    tmp = Path(tempfile.mkdtemp(prefix="cxrray-gpu-"))
    meta = ModelMeta("densenet121", space, pre, [0.5] * space.num_classes, gradcam_layer_path("densenet121"))
    artifact = save_artifact(tmp / "artifact", build_model("densenet121", space.num_outputs, pre), meta)
    paths = []
    for i in range(n):
        (tmp / f"{i}.jpg").write_bytes(xray_jpeg(390, 320, i))
        paths.append(str(tmp / f"{i}.jpg"))
    out = {"images": n, "batch": batch, "jpeg": "390x320 q90"}
    for decoder in ("auto", "pil"):
        predictor = Predictor(artifact, device=device, decoder=decoder)
        batches = [{"path": np.array(paths[i:i + batch], dtype=object)} for i in range(0, n, batch)]

        def run():
            with torch.inference_mode():
                for b in batches:
                    predictor(b)
            sync(device)

        out[f"decoder_{decoder}_img_s"] = round(median_rate(run, n, repeats), 1)
    out["ratio_auto_vs_pil"] = round(out["decoder_auto_img_s"] / out["decoder_pil_img_s"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run on a CPU")
    p.add_argument("--out", help="also write the JSON result here")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    n, batch, steps, repeats = (16, 4, 1, 1) if args.quick else (2048, 256, 10, 5)
    torch.backends.cudnn.benchmark = cuda
    result = {
        "benchmark": "bench_gpu", "date": time.strftime("%Y-%m-%d"), "device": device,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "environment": environment(torch=torch.__version__),
        "decode": bench_decode(device, n, repeats),
        "train": bench_train(device, batch if not cuda else 128, steps),
        "score": bench_score(device, n, batch, repeats),
    }
    return publish(result, args.out, indent=1)


if __name__ == "__main__":
    sys.exit(main())
