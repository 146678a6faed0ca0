"""Bulk-scoring benchmarks (not a test): results go to benchmarks/results/score.md.

compare: images/s of the Ray job (`cxrray.score.score`, both decode placements) against a
plain single-process torch loop over the same files with the same model and the same CPU
budget (torch threads = --cpus; Ray: --cpus one-thread actors), interleaved, --repeats times.

    python benchmarks/bench_score.py compare --data ../shared/data/kermany/chest_xray/test \
        --model small_cnn --size 224 --cpus 2 --repeats 3
    python benchmarks/bench_score.py compare --synthetic dicom --n-patients 100 --size 128   # the DICOM fixture

scale: peak memory of a scoring run (driver + every Ray process it started, sampled from
/proc) on generated archives of growing size; streaming means it should not grow with N.

    python benchmarks/bench_score.py scale --sizes 5000 20000 --cpus 2
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("bench_score")


def make_artifact(out: Path, model: str, size: int) -> Path:
    import torch

    from cxrray.artifact import ModelMeta, save_artifact
    from cxrray.labels import KERMANY_2, MULTICLASS, LabelSpace
    from cxrray.models import build_model, gradcam_layer_path
    from cxrray.transforms import Preprocess

    torch.manual_seed(0)
    space, pre = LabelSpace(KERMANY_2, MULTICLASS), Preprocess(size=size, channels=1)
    net = build_model(model, space.num_outputs, pre)
    return save_artifact(out, net, ModelMeta(model, space, pre, [0.5, 0.5], gradcam_layer_path(model)))


def plain_loop(artifact: Path, paths: list[str], batch_size: int, threads: int) -> float:
    """What a hand-written script does: PIL decode + resize, batch, forward. Returns seconds."""
    import torch
    from PIL import Image

    from cxrray.artifact import load_artifact
    from cxrray.heads import logits_to_probs

    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    model, meta = load_artifact(artifact)
    s = meta.preprocess.size
    def load(p: str) -> np.ndarray:
        if p.endswith(".dcm"):  # what a script does with DICOM: pixel_array, min-max to 8 bits
            import pydicom

            a = pydicom.dcmread(p).pixel_array.astype(np.float32)
            a = (a - a.min()) / max(float(a.max() - a.min()), 1e-6) * 255
            return np.asarray(Image.fromarray(a.astype(np.uint8)).resize((s, s), Image.BILINEAR))
        return np.asarray(Image.open(p).convert("L").resize((s, s), Image.BILINEAR))

    with torch.inference_mode():
        for i in range(0, len(paths), batch_size):
            imgs = [load(p) for p in paths[i : i + batch_size]]
            logits_to_probs(model(torch.from_numpy(np.stack(imgs)[:, None])), meta.label_space).numpy()
    return time.perf_counter() - t0


def compare(args: argparse.Namespace) -> dict:
    import ray

    from cxrray.score import ScoreConfig, list_inputs, score

    work = Path(tempfile.mkdtemp(prefix="bench_score_"))
    try:
        art = make_artifact(work / "art", args.model, args.size)
        if args.synthetic:
            # The synthetic phantoms as an archive: their JPEGs, or the same images as CR/DX DICOM
            # in every transfer syntax this install can write (the hospital case).
            from cxrray.sources.synthetic import SynthConfig, write_synthetic_chexpert
            from cxrray.sources.synthetic_dicom import write_synthetic_dicom

            syn = SynthConfig(n_patients=args.n_patients, size=args.synthetic_size, seed=0)
            jpeg = write_synthetic_chexpert(work / "syn", syn)
            args.data = str(write_synthetic_dicom(work / "syn", syn).root if args.synthetic == "dicom" else jpeg.root)
        inputs = list_inputs(args.data)
        if args.limit:
            inputs = inputs.head(args.limit)
            inputs.to_csv(work / "inputs.csv", index=False)
        source = str(work / "inputs.csv") if args.limit else args.data
        paths = inputs["path"].tolist()
        t0 = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray_init_s = time.perf_counter() - t0
        ray.data.DataContext.get_current().enable_progress_bars = False
        runs: dict[str, list[dict]] = {"plain": [], "ray_actor_decode": [], "ray_task_decode": []}
        for r in range(args.repeats):
            secs = plain_loop(art, paths, args.batch_size, args.cpus)
            runs["plain"].append({"wall_s": secs, "images_per_s": len(paths) / secs})
            for decode in ("actor", "task"):
                out = work / f"out_{decode}_{r}"
                s = score(ScoreConfig(str(art), source, str(out), batch_size=args.batch_size, decode=decode,
                                      chunk_size=args.chunk_size))
                assert s["complete"] and s["errors"] == 0, s
                runs[f"ray_{decode}_decode"].append(
                    {"wall_s": s["wall_s"], "images_per_s": s["images_per_s"], "first_result_s": s["first_result_s"],
                     "actors": s["resources"]["actors"]})
                shutil.rmtree(out)
            log.info("repeat %d: %s", r + 1, {k: round(v[-1]["images_per_s"], 1) for k, v in runs.items()})
        ray.shutdown()
        med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in runs.items()}
        plain = med["plain"]["images_per_s"]
        return {"bench": "compare", "model": args.model, "size": args.size, "images": len(paths), "data": args.data,
                "cpus": args.cpus, "batch_size": args.batch_size, "repeats": args.repeats,
                "ray_init_s": round(ray_init_s, 2), "median": med,
                "ratio_vs_plain": {k: med[k]["images_per_s"] / plain for k in med if k != "plain"},
                # Each repeat runs the three back to back, so a per-repeat ratio cancels most of
                # the drift in load from other jobs on a shared machine.
                "median_paired_ratio": {k: statistics.median(r["images_per_s"] / p["images_per_s"]
                                                             for r, p in zip(runs[k], runs["plain"]))
                                        for k in runs if k != "plain"},
                "runs": runs}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- memory at scale


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids


def _tree(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _mem_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB; PSS splits shared pages (torch libraries, the object store) fairly."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return 0, 0
    vals = {line.split(":")[0]: int(line.split()[1]) for line in rollup[1:] if line.split()[-1] == "kB"}
    return vals.get("Rss", 0), vals.get("Pss", 0)


class MemorySampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.every, self.stop = pid, every, threading.Event()
        self.peak_rss = self.peak_pss = self.peak_driver_rss = self.peak_procs = 0

    def run(self) -> None:
        while not self.stop.is_set():
            pids = _tree(self.pid)
            mem = [_mem_kib(p) for p in pids]
            self.peak_rss = max(self.peak_rss, sum(m[0] for m in mem))
            self.peak_pss = max(self.peak_pss, sum(m[1] for m in mem))
            self.peak_driver_rss = max(self.peak_driver_rss, mem[0][0])
            self.peak_procs = max(self.peak_procs, len(pids))
            self.stop.wait(self.every)


def make_archive(root: Path, n: int) -> list[str]:
    """n tiny noise PNGs in 100 folders (cached between runs)."""
    from PIL import Image

    paths = [root / f"f{i % 100:02d}" / f"img{i:06d}.png" for i in range(n)]
    rng = np.random.default_rng(0)
    made = 0
    for p in paths:
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(p)
            made += 1
    log.info("archive %s: %d images (%d new)", root, n, made)
    return [str(p) for p in paths]


def scale(args: argparse.Namespace) -> dict:
    import pandas as pd

    work = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    results = []
    try:
        art = make_artifact(work / "art", "small_cnn", args.size)
        paths = make_archive(Path(args.archive), max(args.sizes))
        for n in args.sizes:
            for r in range(args.repeats):
                csv = work / f"in_{n}.csv"
                pd.DataFrame({"path": paths[:n]}).to_csv(csv, index=False)
                out = work / f"out_{n}_{r}"
                cmd = [sys.executable, "-m", "cxrray.score", "--artifact", str(art), "--input", str(csv), "--out",
                       str(out), "--json", "--chunk-size", str(args.chunk_size)]
                env = {**os.environ, "PYTHONPATH": str(REPO)}
                t0 = time.perf_counter()
                proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        text=True)
                sampler = MemorySampler(proc.pid)
                sampler.start()
                stdout, _ = proc.communicate(timeout=args.timeout)
                sampler.stop.set()
                sampler.join()
                s = json.loads(stdout.strip().splitlines()[-1])
                assert proc.returncode == 0 and s["complete"] and s["rows"] == n, s
                results.append({"images": n, "repeat": r, "wall_s": round(time.perf_counter() - t0, 1),
                                "job_wall_s": s["wall_s"], "images_per_s": s["images_per_s"],
                                "peak_tree_rss_mib": sampler.peak_rss // 1024, "peak_tree_pss_mib": sampler.peak_pss // 1024,
                                "peak_driver_rss_mib": sampler.peak_driver_rss // 1024, "processes": sampler.peak_procs,
                                "parts": s["parts"]})
                log.info("%s", results[-1])
                shutil.rmtree(out)
        return {"bench": "scale", "size": args.size, "cpus": args.cpus, "results": results}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare")
    c.add_argument("--data", default=str(REPO.parent / "shared/data/kermany/chest_xray/test"))
    c.add_argument("--model", default="small_cnn")
    c.add_argument("--size", type=int, default=224)
    c.add_argument("--limit", type=int, default=0, help="first N images only")
    c.add_argument("--cpus", type=int, default=2)
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--chunk-size", type=int, default=1024)
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--synthetic", choices=("jpeg", "dicom"), default=None,
                   help="score a generated archive instead of --data: the synthetic JPEGs or their DICOM copy")
    c.add_argument("--n-patients", type=int, default=100, help="--synthetic: patients to generate")
    c.add_argument("--synthetic-size", type=int, default=512, help="--synthetic: image size (px)")
    s = sub.add_parser("scale")
    s.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000])
    s.add_argument("--archive", default="/tmp/cxrray_bench_archive")
    s.add_argument("--size", type=int, default=64)
    s.add_argument("--cpus", type=int, default=2)
    s.add_argument("--chunk-size", type=int, default=1024)
    s.add_argument("--repeats", type=int, default=1)
    s.add_argument("--timeout", type=int, default=900)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("cxrray").setLevel(logging.WARNING)
    res = compare(args) if args.cmd == "compare" else scale(args)
    print(json.dumps(res, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
