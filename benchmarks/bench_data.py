"""Input-pipeline benchmark (not a test): images/s of decode -> resize -> normalise.

The ways over the same files, side by side in one run, results to benchmarks/results/data.md:

  single            one process, `transforms.load_resized` (the model-input decode; x cores = CPU limit)
  dataloader        torch DataLoader, --cpus persistent worker processes doing exactly that decode
  ray_files         `cxrray.data.files_dataset(aug=None, epochs=--epochs)` on a local Ray with
                    --cpus CPUs: one execution for every epoch, taken an epoch at a time, as training
                    takes it (train.py)
  ray_files_1pass   the same pipeline with epochs=1, executed again for every epoch (training before
                    2026-12-07, and validation now)
  ray_shards        `cxrray.data.shards_dataset` over Parquet shards written once by `prepare_shards`

With --before, also the pipeline as `cxrray.data` built it before this benchmark: 32-row decode
tasks, and shards through Ray's default (V2) Parquet reader.

Every consumer normalises the uint8 batch to float ((x/255 - 0.5) / 0.25), as `models.CXRModel`
does. A method is timed as a training run uses it: --epochs epochs back to back, start-up
included (the DataLoader's persistent workers, Ray's pipeline), after one untimed epoch of every
method that starts worker processes and warms the page cache. The rate is the run's images over
its seconds: per-epoch times mean little for a pipeline that runs ahead across epochs. Methods
run one after another, not interleaved (a pipeline that runs on in the background would take
CPU from the method being timed); --repeats runs each, and medians are reported. Run it on an
idle machine.

Each timed run also records where the CPU went, in microseconds per image, from /proc: this
process (the consumer), the decode workers (Ray task workers or DataLoader workers), Ray's own
processes (raylet, GCS, agents, Ray Data's stats actors) and the rest of the machine, with the
share of all cores that was busy. On a machine whose cores are all busy, a method's rate is
cores / its total, so the split says what a method spends beyond the decode itself.

    python benchmarks/bench_data.py --cpus 2 --epochs 10 --repeats 3 --sets nih kermany:1000 kermany:5216

Before the pipelines, one decode task's block is decoded in this process (block_decode):
`cxrray.data.decode_files`, which writes each image into the block's array, against the list of
arrays stacked at the end that it replaced, CPU time per image, interleaved (--block-only: just that).

With --cpus 1 on a 2-core machine, the decode has one core and the consumer the other: the rate a
decode core gives when it does not share its core with the consumer (a training process's input
step, on a GPU node, has cores of its own).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _report import environment, publish  # noqa: E402
from cxrray.data import PassStream, untagged  # noqa: E402
from cxrray.labels import LabelSpace  # noqa: E402
from cxrray.transforms import Preprocess, load_resized  # noqa: E402

log = logging.getLogger("bench_data")
SPACE = LabelSpace(("y",))


def kermany_subset(root: Path, n: int, seed: int = 0) -> list[str]:
    """A fixed subset: every train JPEG sorted by path, then a seeded sample of n, sorted."""
    files = sorted(str(p) for p in root.glob("*/*.jpeg"))
    idx = np.sort(np.random.default_rng(seed).choice(len(files), size=min(n, len(files)), replace=False))
    return [files[i] for i in idx]


def frame(paths: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"image_id": [Path(p).name for p in paths], "path": paths,
                         "y": np.zeros(len(paths), np.float32), "split": "train"})


def normalise(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0).sub_(0.5).div_(0.25)


def consume(batches) -> tuple[int, float]:
    """Drain an iterator of {"image": uint8 [N,1,S,S]} batches; (images, seconds to the first batch)."""
    t0, first, n = time.perf_counter(), None, 0
    for b in batches:
        x = normalise(torch.as_tensor(b["image"]))
        n += x.shape[0]
        if first is None:
            first = time.perf_counter() - t0
    return n, first or 0.0


def _proc_cpu(pid: int) -> tuple[str, float] | None:
    """(command line, CPU seconds so far) of a live process, from /proc (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()  # after "(comm)", which may hold spaces
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:  # gone, or not ours to read
        return None
    return cmd, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def cpu_snapshot() -> dict[int, tuple[str, float]]:
    pids = (int(d) for d in os.listdir("/proc") if d.isdigit())
    return {pid: got for pid in pids if (got := _proc_cpu(pid)) is not None}


def _role(pid: int, cmd: str, me: str) -> str:
    """consumer (this process), workers (decode: Ray task workers, DataLoader workers), ray (Ray's own
    processes: raylet, GCS, dashboard agent, Ray Data's stats actors) or other (the rest of the machine)."""
    if pid == os.getpid():
        return "consumer"
    if cmd.startswith("ray::"):
        name = cmd[5:].split()[0] if len(cmd) > 5 else ""
        return "ray" if name.startswith("_") or "Agent" in name else "workers"
    if cmd == me:  # a DataLoader worker: this script forked
        return "workers"
    if "ray" in cmd and ("raylet" in cmd or "gcs_server" in cmd or "/ray/" in cmd or "ray/_private" in cmd):
        return "ray"
    return "other"


def cpu_per_image(before: dict, after: dict, images: int, seconds: float) -> dict:
    """Microseconds of CPU per image by role over a timed run, and how busy the cores were.
    A process started during the run (a DataLoader's workers) counts whole."""
    me = after.get(os.getpid(), ("", 0.0))[0]
    used: dict[str, float] = {"consumer": 0.0, "workers": 0.0, "ray": 0.0, "other": 0.0}
    for pid, (cmd, cpu) in after.items():
        used[_role(pid, cmd, me)] += cpu - before.get(pid, (cmd, 0.0))[1]
    out = {k: 1e6 * v / images for k, v in used.items()}
    out["total"] = sum(out.values())
    out["cores_busy"] = sum(used.values()) / (seconds * (os.cpu_count() or 1))
    return out


class FileDataset(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], pre: Preprocess):
        self.paths, self.pre = paths, pre

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.from_numpy(load_resized(self.paths[i], self.pre)[0]),
                "labels": torch.zeros(1)}


def run_single(paths: list[str], pre: Preprocess, batch: int) -> tuple[int, float]:
    def batches():
        for i in range(0, len(paths), batch):
            yield {"image": np.stack([load_resized(p, pre)[0] for p in paths[i:i + batch]])}
    return consume(batches())


def _legacy(ds, rows: int, pre: Preprocess, fn):
    return ds.map_batches(fn, batch_size=rows, batch_format="numpy",
                          fn_kwargs={"pre": pre, "aug": None, "label_cols": list(SPACE.columns)})


class Methods:
    """One epoch of each method; construction does the one-off work (shards, loader, datasets)."""

    def __init__(self, paths: list[str], pre: Preprocess, cpus: int, batch: int, epochs: int, work: Path):
        import ray

        from cxrray.data import _read_shards, decode_files, decode_shard_rows, files_dataset, prepare_shards, \
            shards_dataset

        self.paths, self.pre, self.batch = paths, pre, batch
        self.cpus = cpus
        df = frame(paths)
        self.n_epochs = epochs
        self.ds = {"ray_files": files_dataset(df, SPACE, pre, None, batch, epochs=self.n_epochs),
                   "ray_files_1pass": files_dataset(df, SPACE, pre, None, batch)}
        t0 = time.perf_counter()
        info = prepare_shards(df, SPACE, work / "shards", size=pre.size, progress=False)
        self.prepare_s = time.perf_counter() - t0
        self.n_shards = info.shards["train"]
        shard_dir = work / "shards" / "train"
        self.ds["ray_shards"] = shards_dataset(work / "shards", "train", SPACE, pre, None, batch)
        # cxrray.data before this benchmark: 64-row blocks decoded in tasks of one batch (32 rows);
        # shards through Ray's default (V2) Parquet reader, also in 32-row tasks.
        cols = ["image_id", "path", *SPACE.columns]
        parts = [df[cols].iloc[i:i + 64] for i in range(0, len(df), 64)]
        self.ds["ray_files_before"] = _legacy(ray.data.from_pandas(parts), batch, pre, decode_files)
        self.ds["ray_shards_before"] = _legacy(ray.data.read_parquet(str(shard_dir)), batch, pre, decode_shard_rows)
        self.ds["ray_shards_v1_32rows"] = _legacy(_read_shards(shard_dir), batch, pre, decode_shard_rows)

    def epochs(self, method: str) -> Iterator[tuple[int, float]]:
        """(images, seconds to the first batch) of each of n_epochs epochs, timed by the caller."""
        if method == "ray_files":  # one execution: epoch k is pass k of it, as train.py takes it
            run = PassStream(self.ds[method].iter_torch_batches(batch_size=self.batch))
            for k in range(self.n_epochs):
                yield consume(untagged(b) for b in run.epoch(k))
            return
        if method == "dataloader":  # a run's own workers, kept across its epochs, as a training script has
            loader = torch.utils.data.DataLoader(FileDataset(self.paths, self.pre), batch_size=self.batch,
                                                 num_workers=self.cpus, persistent_workers=True)
            for _ in range(self.n_epochs):
                yield consume(loader)
            del loader
            return
        for _ in range(self.n_epochs):
            if method == "single":
                yield run_single(self.paths, self.pre, self.batch)
            else:
                yield consume(self.ds[method].iter_torch_batches(batch_size=self.batch))


METHODS = ("single", "dataloader", "ray_files", "ray_files_1pass", "ray_shards")
BEFORE = ("ray_files_before", "ray_shards_before", "ray_shards_v1_32rows")


def bench_set(name: str, paths: list[str], args: argparse.Namespace, work: Path) -> dict:
    pre = Preprocess(size=args.size, channels=1)
    m = Methods(paths, pre, args.cpus, args.batch, args.epochs, work / name)
    methods = METHODS + (BEFORE if args.before else ())
    for k in methods:  # untimed: worker processes up and importing, page cache warm
        next(m.epochs(k if k != "ray_files" else "ray_files_1pass"))
    runs: dict[str, list[dict]] = {k: [] for k in methods}
    for rep in range(args.repeats):
        for k in methods:
            cpu0 = cpu_snapshot()
            t0 = time.perf_counter()
            ends = []
            for n, first in m.epochs(k):
                assert n == len(paths), (k, n, len(paths))
                ends.append(time.perf_counter() - t0)
                if len(ends) == 1:
                    first_batch = first
                if len(ends) == m.n_epochs:  # before a DataLoader's workers exit with it
                    cpu = cpu_per_image(cpu0, cpu_snapshot(), len(paths) * len(ends), ends[-1])
            runs[k].append({"seconds": ends[-1], "images_per_s": len(paths) * len(ends) / ends[-1],
                            "first_batch_s": first_batch, "first_epoch_s": ends[0],
                            **{f"cpu_us_per_image_{role}": v for role, v in cpu.items()}})
        log.info("%s repeat %d: %s", name, rep + 1, {k: round(v[-1]["images_per_s"]) for k, v in runs.items()})
    med = {k: {f: statistics.median(x[f] for x in v) for f in v[0]} for k, v in runs.items()}
    ips = {k: med[k]["images_per_s"] for k in methods}
    limit = ips["single"] * args.cpus
    return {"set": name, "images": len(paths), "epochs_per_run": m.n_epochs,
            "prepare_shards_s": m.prepare_s, "n_shards": m.n_shards,
            "median": med, "cpu_limit_images_per_s": limit,
            "core_scaling_ray_files": ips["ray_files"] / limit,
            "core_scaling_dataloader": ips["dataloader"] / limit,
            "ratio_ray_files_vs_dataloader": ips["ray_files"] / ips["dataloader"],
            "ratio_ray_files_1pass_vs_dataloader": ips["ray_files_1pass"] / ips["dataloader"],
            "ratio_ray_shards_vs_dataloader": ips["ray_shards"] / ips["dataloader"],
            "ratio_shards_vs_files": ips["ray_shards"] / ips["ray_files"],
            "runs": {k: [round(x["images_per_s"], 1) for x in v] for k, v in runs.items()}}


def _stacked_block(paths: list[str], pre: Preprocess) -> np.ndarray:
    """The baseline: a decode task's block as cxrray.data built it before 2026-12-07 (late), a
    list of per-image arrays and one np.stack at the end."""
    return np.stack([load_resized(p, pre)[0] for p in paths])


def block_decode(paths: list[str], pre: Preprocess, repeats: int) -> dict:
    """CPU µs per image to decode one task's block in this process: `cxrray.data.decode_files`
    (each image written into the block's array) against `_stacked_block`, interleaved, medians.
    The block is as large as a decode task's output may be (MAX_TASK_BYTES), or the whole set."""
    from cxrray.data import MAX_TASK_BYTES, decode_files

    block = paths[:max(1, MAX_TASK_BYTES // (pre.size * pre.size))]
    batch = {"path": np.array(block, dtype=object)}

    def filled() -> np.ndarray:
        return decode_files(batch, pre=pre, aug=None, label_cols=[])["image"]

    assert np.array_equal(filled(), _stacked_block(block, pre))  # same images, and both warm
    cpu: dict[str, list[float]] = {"filled": [], "stacked": []}
    for _ in range(repeats):
        for name, fn in (("filled", filled), ("stacked", lambda: _stacked_block(block, pre))):
            t0 = time.process_time()
            fn()
            cpu[name].append(1e6 * (time.process_time() - t0) / len(block))
    med = {k: statistics.median(v) for k, v in cpu.items()}
    return {"rows": len(block), "cpu_us_per_image_filled": med["filled"],
            "cpu_us_per_image_stacked": med["stacked"], "ratio_filled_vs_stacked": med["filled"] / med["stacked"],
            "runs": {k: [round(x, 1) for x in v] for k, v in cpu.items()}}


def ray_overhead(rounds: int) -> dict:
    """Ray Data's fixed costs on this machine: a trivial 1,000-row map_batches in 8 and in 32 tasks."""
    import ray

    out = {}
    for tasks in (1, 8, 32):
        ds = ray.data.range(1000, override_num_blocks=tasks).map_batches(lambda b: b, batch_size=1000 // tasks)
        secs = []
        for r in range(rounds + 1):
            t0 = time.perf_counter()
            sum(len(b["id"]) for b in ds.iter_batches(batch_size=32))
            if r:
                secs.append(time.perf_counter() - t0)
        out[f"{tasks}_tasks_ms"] = 1000 * statistics.median(secs)
    out["per_task_ms"] = (out["32_tasks_ms"] - out["8_tasks_ms"]) / 24
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nih", default=str(REPO.parent / "shared/data/nih14/images"))
    p.add_argument("--kermany", default=str(REPO.parent / "shared/data/kermany/chest_xray/train"))
    p.add_argument("--sets", nargs="*", default=["nih", "kermany:1000"],
                   help="nih (all 200 PNGs) and/or kermany:N (a fixed sample of N train JPEGs)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--cpus", type=int, default=2, help="DataLoader workers = Ray CPUs")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=10, help="epochs in one timed run (a training run's)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method; medians are reported")
    p.add_argument("--before", action="store_true",
                   help="also time the pipeline as cxrray.data built it before this benchmark (see BEFORE)")
    p.add_argument("--block-only", action="store_true",
                   help="only the one-process block decode (block_decode), no pipelines and no Ray")
    p.add_argument("--out", default=None, help="write the JSON result here too")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("ray").setLevel(logging.WARNING)
    # The consumer's normalise runs on one thread, as a training process's input step would
    # be one op among many; torch's default pool (one thread per core) spins under contention.
    torch.set_num_threads(1)
    import ray

    def files(spec: str) -> list[str]:
        if spec == "nih":
            return sorted(str(x) for x in Path(args.nih).glob("*.png"))
        name, _, n = spec.partition(":")
        if name != "kermany":
            raise SystemExit(f"unknown set {spec!r}: use nih or kermany:N")
        return kermany_subset(Path(args.kermany), int(n or 1000))

    pre = Preprocess(size=args.size, channels=1)
    blocks = {s: block_decode(files(s), pre, max(5, args.repeats)) for s in args.sets}
    for name, b in blocks.items():
        log.info("%s block of %d: filled %.1f, stacked %.1f CPU us an image (%.3fx)", name, b["rows"],
                 b["cpu_us_per_image_filled"], b["cpu_us_per_image_stacked"], b["ratio_filled_vs_stacked"])
    if args.block_only:
        return publish({"bench": "data_block", "size": args.size, **environment(torch=torch.__version__),
                        "block_decode": blocks}, args.out)
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    # address="local": always a fresh private cluster, never someone else's `ray start`.
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        results = [bench_set(s.replace(":", "_"), files(s), args, work) for s in args.sets]
        overhead = ray_overhead(5)
        log.info("Ray Data fixed costs: %s", overhead)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    return publish({"bench": "data", "cpus": args.cpus, "batch": args.batch, "size": args.size,
                    "epochs": args.epochs, "repeats": args.repeats,
                    **environment(ray=ray.__version__, torch=torch.__version__), "ray_data_overhead": overhead,
                    "block_decode": blocks, "results": results}, args.out)


if __name__ == "__main__":
    sys.exit(main())
