"""Storage benchmark (not a test): results go to benchmarks/results/storage.md.

Bulk-scoring images/s with the output on local disk against the output on S3 (moto's S3
server on 127.0.0.1, started by this script), side by side in one Ray session, plus S3 input
-> S3 output. Each round runs the three cases back to back, in alternating order, each into a
fresh output folder/prefix, with the library call `cxrray.score.score` (Ray already up):

    (a) local input -> local folder     (b) local input -> s3://bucket/out-b-N
    (c) s3://bucket/in -> s3://bucket/out-c-N

It also times a plain `cxrray.score.read_predictions` of each committed output, and, on the
driver, how long each kind of storage call took (part PUTs, commit records, listings, reads),
so a slower S3 case shows where its time goes.

    python benchmarks/bench_storage.py --rounds 5
"""
from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import logging
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("bench_storage")
DEFAULT_DATA = REPO.parent / "shared/data/kermany/chest_xray/test"
RESULTS = REPO / "benchmarks/results/storage.md"
CASES = {"a": "local in → local out", "b": "local in → S3 out", "c": "S3 in → S3 out"}
LOADED = 2.5  # 1-min load average on a 2-core machine above which the numbers are marked


def make_artifact(out: Path, model: str, size: int) -> Path:
    """As bench_score.py: an untrained model (throughput is what counts)."""
    import torch

    from cxrray.artifact import ModelMeta, save_artifact
    from cxrray.labels import KERMANY_2, MULTICLASS, LabelSpace
    from cxrray.models import build_model, gradcam_layer_path
    from cxrray.transforms import Preprocess

    torch.manual_seed(0)
    space, pre = LabelSpace(KERMANY_2, MULTICLASS), Preprocess(size=size, channels=1)
    net = build_model(model, space.num_outputs, pre)
    return save_artifact(out, net, ModelMeta(model, space, pre, [0.5, 0.5], gradcam_layer_path(model)))


def synthetic_images(root: Path, n: int) -> Path:
    """n 224-px noise PNGs in two class folders (when the Kermany test set is absent)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        p = root / ("NORMAL" if i % 2 else "PNEUMONIA") / f"img{i:05d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (224, 224), dtype=np.uint8)).save(p)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------- driver-side storage timing


class StorageTimer:
    """Wraps cxrray.storage's functions in this (the driver's) process and sums seconds and
    calls per operation. The actors' reads of S3 inputs run in other processes: not counted."""

    OPS = ("write_bytes", "read_bytes", "list_files", "list_dir", "info", "read_parquet", "parquet_file", "delete")

    def __init__(self):
        from cxrray import storage

        self.storage, self.lock = storage, threading.Lock()
        self.secs: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.orig = {op: getattr(storage, op) for op in self.OPS}
        for op, fn in self.orig.items():
            setattr(storage, op, self._wrap(op, fn))

    def _wrap(self, op, fn):
        @functools.wraps(fn)
        def timed(path, *a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(path, *a, **kw)
            finally:
                key = op
                if op == "write_bytes":  # tell the three kinds of writes apart
                    p = os.fspath(path)
                    key = ("write part" if p.endswith(".parquet") else
                           "write commit record" if "/_commits/" in p else "write manifest/lease")
                with self.lock:
                    self.secs[key] += time.perf_counter() - t0
                    self.calls[key] += 1

        return timed

    def take(self) -> dict[str, dict]:
        with self.lock:
            out = {k: {"s": round(self.secs[k], 3), "calls": self.calls[k]} for k in sorted(self.secs)}
            self.secs.clear()
            self.calls.clear()
        return out

    def restore(self) -> None:
        for op, fn in self.orig.items():
            setattr(self.storage, op, fn)


# ------------------------------------------------------------------------------------ the run


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    mem_kib = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal")))
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    return {"nproc": int(nproc), "cpu": model, "arch": platform.machine(), "mem_gib": round(mem_kib / 2**20, 1)}


def run(args: argparse.Namespace) -> dict:
    loads = [("start", os.getloadavg())]
    work = Path(tempfile.mkdtemp(prefix="bench_storage_"))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # Before ray.init: Ray workers inherit the driver's environment, so actors reading s3://
    # inputs reach the same server with the same credentials.
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    ray_up = False
    timer = None
    try:
        import boto3
        import ray

        from cxrray import storage
        from cxrray.score import ScoreConfig, list_inputs, read_predictions, score

        bucket = f"bench-storage-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        data = Path(args.data)
        if data.is_dir():
            source = "kermany test set"
        else:
            log.info("%s absent: generating %d synthetic PNGs", data, args.synthetic)
            data, source = synthetic_images(work / "synthetic", args.synthetic), f"{args.synthetic} synthetic PNGs"
        n_images = len(list_inputs(str(data)))
        input_bytes = sum(p.stat().st_size for p in data.rglob("*") if p.is_file())
        s3_in = f"s3://{bucket}/in"
        t0 = time.perf_counter()
        storage.upload_dir(data, s3_in)
        upload_s = time.perf_counter() - t0
        assert len(list_inputs(s3_in)) == n_images
        art = make_artifact(work / "art", args.model, args.size)

        t0 = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray_up = True
        ray_init_s = time.perf_counter() - t0
        ray.data.DataContext.get_current().enable_progress_bars = False
        loads.append(("after ray.init", os.getloadavg()))

        timer = StorageTimer()
        inputs = {"a": str(data), "b": str(data), "c": s3_in}
        runs: dict[str, list[dict]] = {k: [] for k in CASES}
        for r in range(args.rounds):
            order = list(CASES) if r % 2 == 0 else list(reversed(CASES))
            for case in order:
                out = str(work / f"out-a-{r}") if case == "a" else f"s3://{bucket}/out-{case}-{r}"
                timer.take()
                s = score(ScoreConfig(str(art), inputs[case], out, chunk_size=args.chunk_size, actors=args.actors))
                ops = timer.take()
                assert s["complete"] and s["errors"] == 0 and s["rows"] == n_images, s
                t0 = time.perf_counter()
                df = read_predictions(out)
                read_s = time.perf_counter() - t0
                assert len(df) == n_images
                load1 = os.getloadavg()[0]
                runs[case].append({"round": r + 1, "images_per_s": s["images_per_s"], "wall_s": s["wall_s"],
                                   "first_result_s": s["first_result_s"], "parts": s["parts"],
                                   "after_first_per_s": round(n_images / max(s["wall_s"] - s["first_result_s"], 1e-9), 2),
                                   "read_s": round(read_s, 3), "load1": round(load1, 2), "storage_ops": ops})
                loads.append((f"round {r + 1} {case}", os.getloadavg()))
            log.info("round %d/%d img/s: %s", r + 1, args.rounds,
                     {k: v[-1]["images_per_s"] for k, v in runs.items()})
        loads.append(("end", os.getloadavg()))
    finally:
        if timer is not None:
            timer.restore()
        if ray_up:
            import ray

            ray.shutdown()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    import pyarrow
    import torch

    med = {k: {m: statistics.median(x[m] for x in v) for m in ("images_per_s", "wall_s", "first_result_s", "after_first_per_s", "read_s")}
           for k, v in runs.items()}
    paired = {k: statistics.median(x["images_per_s"] / a["images_per_s"] for x, a in zip(runs[k], runs["a"]))
              for k in ("b", "c")}
    ops_med: dict[str, dict[str, dict]] = {}
    for k, v in runs.items():
        names = sorted({n for x in v for n in x["storage_ops"]})
        ops_med[k] = {n: {"s": statistics.median(x["storage_ops"].get(n, {"s": 0})["s"] for x in v),
                          "calls": statistics.median(x["storage_ops"].get(n, {"calls": 0})["calls"] for x in v)}
                      for n in names}
    return {"bench": "storage", "date": dt.date.today().isoformat(), "machine": machine(),
            "versions": {"python": platform.python_version(), "ray": ray.__version__, "torch": torch.__version__,
                         "pyarrow": pyarrow.__version__, "moto": __import__("moto").__version__},
            "command": "python benchmarks/bench_storage.py " + " ".join(args.argv), "rounds": args.rounds,
            "data": source, "images": n_images, "input_mib": round(input_bytes / 2**20, 1),
            "model": args.model, "size": args.size, "cpus": args.cpus, "actors": args.actors,
            "chunk_size": args.chunk_size, "upload_s": round(upload_s, 2), "ray_init_s": round(ray_init_s, 2),
            "loads": [(w, [round(x, 2) for x in la]) for w, la in loads],
            "loaded": any(la[0] > LOADED for _, la in loads) or any(x["load1"] > LOADED for v in runs.values()
                                                                     for x in v),
            "median": med, "ratio_vs_a": {k: med[k]["images_per_s"] / med["a"]["images_per_s"] for k in ("b", "c")},
            "median_paired_ratio": paired, "storage_ops_median": ops_med, "runs": runs}


# ----------------------------------------------------------------------------------- the report


def markdown(res: dict) -> str:
    m, med = res["machine"], res["median"]
    loaded = " (loaded)" if res["loaded"] else ""
    la = {w: v for w, v in res["loads"]}
    peak = max(v[0] for v in la.values())
    lines = [
        "# Storage benchmark: local vs S3 output (and S3 input)", "",
        f"Machine: {m['nproc']}-core {m['arch']} ({m['cpu']}), {m['mem_gib']:.0f} GiB, no GPU. "
        f"Date: {res['date']}. Ray {res['versions']['ray']}, torch {res['versions']['torch']}, "
        f"pyarrow {res['versions']['pyarrow']}, moto {res['versions']['moto']}, Python {res['versions']['python']}.",
        "Script: `benchmarks/bench_storage.py`.", "",
        "```", res["command"], "```", "",
        f"- Data: {res['data']}, {res['images']} images ({res['input_mib']} MiB); the S3-input case reads a copy "
        f"uploaded once with `cxrray.storage.upload_dir` ({res['upload_s']} s, not in any figure).",
        f"- S3 = moto's `ThreadedMotoServer` on 127.0.0.1 (a thread in the driver process, sharing its GIL), "
        f"reached through pyarrow's S3 filesystem via `AWS_ENDPOINT_URL`: this measures the protocol's "
        f"request count and moto's cost, not network latency or AWS.",
        f"- Model: untrained `{res['model']}` at {res['size']} px, 2 classes. Ray: `ray.init(num_cpus={res['cpus']})` "
        f"once ({res['ray_init_s']} s, excluded); each case is one `cxrray.score.score(ScoreConfig(..., "
        f"chunk_size={res['chunk_size']}, actors={res['actors']}))` into a fresh folder/prefix, so img/s includes "
        f"listing, actor start-up, part + commit-record writes, the output lock and the final check.",
        f"- {res['rounds']} rounds, each running (a), (b), (c) back to back, order reversed every other round. "
        f"Medians over rounds; the *paired* ratio is the median of per-round ratios (cancels load drift).",
        f"- Load average (1/5/15 min): start {la['start']}, end {la['end']}, highest 1-min {peak:.2f}"
        + (f" — above {LOADED} on this 2-core machine shared with other jobs, so the table is marked (loaded)."
           if res["loaded"] else "."), "",
        f"## Results{loaded}", "",
        "| case | img/s (median) | wall s | first result s | img/s after first result | vs (a), medians | "
        "vs (a), paired | read_predictions s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, label in CASES.items():
        ratio = "1.00×" if k == "a" else f"{res['ratio_vs_a'][k]:.2f}×"
        paired = "1.00×" if k == "a" else f"**{res['median_paired_ratio'][k]:.2f}×**"
        lines.append(f"| ({k}) {label} | {med[k]['images_per_s']:.1f} | {med[k]['wall_s']:.1f} | "
                     f"{med[k]['first_result_s']:.1f} | {med[k]['after_first_per_s']:.1f} | {ratio} | {paired} | {med[k]['read_s']:.3f} |")
    lines += ["", "*img/s after first result* = images ÷ (wall − time to first result): roughly the rate once "
              "the actors are up (the remainder still holds the driver's pre- and post-pipeline steps).", "",
              "Per round (img/s, a / b / c; 1-min load after each case): "
              + "; ".join(f"{i + 1}: " + "/".join(f"{res['runs'][k][i]['images_per_s']:.1f}" for k in CASES)
                          + " (" + "/".join(f"{res['runs'][k][i]['load1']:.1f}" for k in CASES) + ")"
                          for i in range(res["rounds"])), ""]
    lines += ["## Where the driver's storage time goes (median per job)", "",
              "Seconds spent inside `cxrray.storage` calls on the driver (wrapped by the script; the actors' "
              "reads of S3 inputs happen in other processes and are not included). These calls run on the "
              "driver thread that also consumes results, so they add to the job's wall time.", "",
              "| operation | " + " | ".join(f"({k}) s / calls" for k in CASES) + " |",
              "|---|" + "---|" * len(CASES)]
    ops = sorted({n for k in CASES for n in res["storage_ops_median"][k]})
    for n in ops:
        cells = []
        for k in CASES:
            o = res["storage_ops_median"][k].get(n)
            cells.append(f"{o['s']:.3f} / {o['calls']:g}" if o else "–")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    tot = {k: sum(o["s"] for o in res["storage_ops_median"][k].values()) for k in CASES}
    lines.append("| **total** | " + " | ".join(f"**{tot[k]:.3f}** ({100 * tot[k] / med[k]['wall_s']:.1f} % of wall)"
                                               for k in CASES) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--synthetic", type=int, default=600, help="images to generate when --data is absent")
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=128)
    p.add_argument("--out", default=str(RESULTS), help="markdown report")
    raw = sys.argv[1:] if argv is None else argv
    args = p.parse_args(raw)
    args.argv = raw
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("cxrray").setLevel(logging.WARNING)
    res = run(args)
    md = markdown(res)
    Path(args.out).write_text(md)
    print(md)
    print(json.dumps(res, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
