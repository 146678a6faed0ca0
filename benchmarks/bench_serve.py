"""Online inference benchmark on loopback: latency/throughput, batching on vs off, autoscaling,
and a replica killed under load. Bounded in requests and time; stops by itself.

    python benchmarks/bench_serve.py                       # ~4-5 min on a 2-core CPU box
    python benchmarks/bench_serve.py --quick               # ~1.5 min smoke run
    python benchmarks/bench_serve.py --artifact runs/x/artifacts/best --out /tmp/serve.md

Without --artifact it benchmarks an untrained small_cnn at --size px (the compute does not
depend on the weights). Results (medians over --repeats runs per cell) go to
benchmarks/results/serve.md with the command, machine and date.
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
from PIL import Image

log = logging.getLogger("bench_serve")
APP = "bench"
DEPLOYMENT = "CXRServer"


# ---------------------------------------------------------------------------- inputs


def make_artifact(out: Path, size: int) -> Path:
    import torch

    from cxrray.artifact import ModelMeta, save_artifact
    from cxrray.labels import SYNTHETIC_FINDINGS, LabelSpace
    from cxrray.models import build_model, gradcam_layer_path
    from cxrray.transforms import Preprocess

    torch.manual_seed(0)
    space = LabelSpace(SYNTHETIC_FINDINGS)
    pre = Preprocess(size=size, channels=1, mean=(0.5,), std=(0.25,))
    meta = ModelMeta("small_cnn", space, pre, [0.5] * space.num_classes, gradcam_layer_path("small_cnn"),
                     summary={"trainer": "none (benchmark: untrained weights)"})
    return save_artifact(out, build_model("small_cnn", space.num_outputs, pre), meta)


def upload_images(n: int = 8, side: int = 512) -> list[bytes]:
    """Chest-sized PNG uploads (grey, noisy): decoding and resizing are part of the cost."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        img = (rng.random((side, side)) * 60 + np.linspace(60, 190, side)[None, :]).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- load


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests
    failures: int = 0
    wall: float = 0.0
    events: list[tuple[float, bool]] = field(default_factory=list)  # (time since start, ok)

    @property
    def ok(self) -> int:
        return len(self.latencies)

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1000) if self.latencies else float("nan")

    @property
    def throughput(self) -> float:
        return self.ok / self.wall if self.wall else 0.0


def run_load(url: str, path: str, images: list[bytes], concurrency: int, *, max_requests: int,
             max_seconds: float, timeout: float = 30.0, stop: threading.Event | None = None) -> LoadResult:
    """`concurrency` closed-loop clients until max_requests are sent or max_seconds pass."""
    res = LoadResult()
    lock = threading.Lock()
    sent = [0]
    t0 = time.perf_counter()
    deadline = t0 + max_seconds

    def client(i: int) -> None:
        with requests.Session() as s:
            k = i
            while time.perf_counter() < deadline and not (stop and stop.is_set()):
                with lock:
                    if sent[0] >= max_requests:
                        return
                    sent[0] += 1
                t = time.perf_counter()
                try:
                    ok = s.post(url + path, data=images[k % len(images)], timeout=timeout).status_code == 200
                except requests.RequestException:
                    ok = False
                done = time.perf_counter()
                with lock:
                    res.events.append((done - t0, ok))
                    if ok:
                        res.latencies.append(done - t)
                    else:
                        res.failures += 1
                k += concurrency

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    res.wall = time.perf_counter() - t0
    return res


# ---------------------------------------------------------------------------- serve helpers


def deploy(artifact: Path, **args) -> None:
    from ray import serve

    from cxrray.serve import build_app

    serve.run(build_app({"artifact": str(artifact), **args}), name=APP, route_prefix="/")


def replica_states() -> dict[str, int]:
    from ray import serve

    try:
        dep = serve.status().applications[APP].deployments[DEPLOYMENT]
        return {str(getattr(k, "value", k)): v for k, v in dep.replica_states.items()}
    except Exception:  # noqa: BLE001 - app mid-update
        return {}


def running() -> int:
    return replica_states().get("RUNNING", 0)


def wait_running(n: int, timeout: float = 120.0) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if running() == n and sum(replica_states().values()) == n:
            return time.perf_counter() - t0
        time.sleep(0.5)
    raise TimeoutError(f"deployment did not reach {n} running replicas in {timeout}s: {replica_states()}")


def replica_actor_names() -> list[str]:
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    reps = details["applications"][APP]["deployments"][DEPLOYMENT]["replicas"]
    return [r["actor_name"] for r in reps if r.get("state") == "RUNNING"]


# ---------------------------------------------------------------------------- experiments


def latency_matrix(url: str, artifact: Path, images: list[bytes], a) -> list[dict]:
    rows = []
    for mode, batch in (("on", a.batch_size), ("off", 1)):
        deploy(artifact, max_batch_size=batch, explain_max_batch_size=min(batch, 4), batch_wait_timeout_s=0.01,
               num_threads=1, deployment={"num_replicas": 1, "autoscaling_config": None})
        wait_running(1)
        for path in ("/predict", "/explain"):
            run_load(url, path, images, 2, max_requests=6, max_seconds=10)  # warm-up
            for c in a.concurrency:
                before = requests.get(url + "/stats", timeout=10).json()[path.strip("/")]
                reps = [run_load(url, path, images, c, max_requests=a.max_requests, max_seconds=a.cell_seconds)
                        for _ in range(a.repeats)]
                row = {"batching": mode, "endpoint": path, "concurrency": c,
                       "rps": statistics.median(r.throughput for r in reps),
                       "p50": statistics.median(r.pct(50) for r in reps),
                       "p95": statistics.median(r.pct(95) for r in reps),
                       "p99": statistics.median(r.pct(99) for r in reps),
                       "n": sum(r.ok for r in reps), "failed": sum(r.failures for r in reps)}
                after = requests.get(url + "/stats", timeout=10).json()[path.strip("/")]
                batches = after["batches"] - before["batches"]
                row["mean_batch"] = (after["requests"] - before["requests"]) / batches if batches else 0.0
                rows.append(row)
                log.info("%s", row)
    return rows


def autoscaling(url: str, artifact: Path, images: list[bytes], a) -> dict:
    deploy(artifact, max_batch_size=a.batch_size, num_threads=1, deployment={
        "num_replicas": "auto", "max_ongoing_requests": 32,
        "autoscaling_config": {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 2,
                               "target_ongoing_requests": 2, "upscale_delay_s": 2, "downscale_delay_s": 8,
                               "metrics_interval_s": 1, "look_back_period_s": 4}})
    wait_running(1)
    timeline: list[tuple[float, int, str]] = []
    stop = threading.Event()
    t0 = time.perf_counter()

    def sample() -> None:
        while not stop.is_set():
            phase = "load" if load_on.is_set() else "idle"
            timeline.append((time.perf_counter() - t0, running(), phase))
            time.sleep(1.0)

    load_on = threading.Event()
    load_on.set()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    res = run_load(url, "/predict", images, a.scale_concurrency, max_requests=100_000, max_seconds=a.scale_load_seconds)
    load_on.clear()
    t_load_end = time.perf_counter() - t0
    deadline = time.perf_counter() + a.scale_idle_seconds
    while time.perf_counter() < deadline:
        if timeline and timeline[-1][2] == "idle" and timeline[-1][1] == 1 and max(n for _, n, _ in timeline) > 1:
            time.sleep(2)
            break
        time.sleep(1)
    stop.set()
    sampler.join()
    peak = max((n for _, n, _ in timeline), default=0)
    up = next((t for t, n, _ in timeline if n > 1), None)
    down = next((t for t, n, ph in timeline if ph == "idle" and n == 1 and up is not None and t > up), None)
    return {"timeline": timeline, "peak": peak, "scaled_up_at": up, "scaled_down_at": down,
            "load_end": t_load_end, "requests": res.ok, "failed": res.failures, "rps": res.throughput}


def fault(url: str, artifact: Path, images: list[bytes], a) -> dict:
    import ray

    deploy(artifact, max_batch_size=a.batch_size, num_threads=1,
           deployment={"num_replicas": 2, "autoscaling_config": None})
    wait_running(2)
    out: dict = {}
    result: dict = {}

    def load() -> None:
        result["r"] = run_load(url, "/predict", images, 8, max_requests=100_000, max_seconds=a.fault_seconds)

    th = threading.Thread(target=load)
    t0 = time.perf_counter()
    th.start()
    time.sleep(a.fault_seconds / 4)
    victim = replica_actor_names()[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    t_kill = time.perf_counter() - t0
    out["victim"] = victim
    t_back = None
    while time.perf_counter() - t0 < a.fault_seconds + 60:
        if running() == 2 and victim not in replica_actor_names():
            t_back = time.perf_counter() - t0
            break
        time.sleep(0.5)
    th.join()
    r: LoadResult = result["r"]
    fails = [t for t, ok in r.events if not ok]
    after_kill = [t for t, ok in r.events if t >= t_kill]
    out.update(kill_at=t_kill, replaced_after=(t_back - t_kill) if t_back else None,
               requests=len(r.events), failed=len(fails),
               last_failure_after=(max(fails) - t_kill) if fails else None,
               served_after_kill=sum(1 for t, ok in r.events if ok and t >= t_kill),
               total_after_kill=len(after_kill))
    return out


# ---------------------------------------------------------------------------- report


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0) + " (unused: replicas run on CPU here)"
    except Exception:  # noqa: BLE001
        pass
    return f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), {mem:.0f} GiB, {gpu}"


def write_report(out: Path, a, rows: list[dict], scale: dict, flt: dict, seconds: float) -> None:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = "?"
    cmd = "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:])
    L = [
        "# Serving benchmark (Ray Serve, loopback HTTP)",
        "",
        f"- command: `{cmd}`",
        f"- machine: {machine()}; shared with other jobs, so numbers are noisy (medians of {a.repeats} runs per cell);"
        f" 1-min load average {a.load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; commit {commit}; Ray {__import__('ray').__version__},"
        f" torch {__import__('torch').__version__}",
        f"- model: {a.model_desc}; uploads: 512x512 8-bit PNG (~{a.upload_kib:.0f} KiB),"
        " decoded and resized per request",
        f"- one replica (1 CPU, 1 torch thread) unless stated; closed-loop clients; each cell at most"
        f" {a.max_requests} requests or {a.cell_seconds:.0f} s; total run {seconds / 60:.1f} min",
        "",
        "## Latency and throughput",
        "",
        "| batching | endpoint | concurrency | req/s | p50 ms | p95 ms | p99 ms | mean batch | ok | failed |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        L.append(f"| {r['batching']} | {r['endpoint']} | {r['concurrency']} | {r['rps']:.1f} | {r['p50']:.0f} |"
                 f" {r['p95']:.0f} | {r['p99']:.0f} | {r['mean_batch']:.2f} | {r['n']} | {r['failed']} |")
    cell = {(r["batching"], r["endpoint"], r["concurrency"]): r for r in rows}
    L += ["", "Explain / predict (batching on):", ""]
    for c in a.concurrency:
        p, e = cell.get(("on", "/predict", c)), cell.get(("on", "/explain", c))
        if p and e:
            L.append(f"- concurrency {c}: p50 latency x{e['p50'] / p['p50']:.2f}, throughput x{p['rps'] / e['rps']:.2f}"
                     " (goal <= 3x)")
    L += ["", "Batching on vs off (/predict throughput):", ""]
    for c in a.concurrency:
        on, off = cell.get(("on", "/predict", c)), cell.get(("off", "/predict", c))
        if on and off:
            L.append(f"- concurrency {c}: {on['rps']:.1f} vs {off['rps']:.1f} req/s (x{on['rps'] / off['rps']:.2f})")
    tl = ", ".join(f"{t:.0f}s:{n}{'' if ph == 'load' else '*'}" for t, n, ph in scale["timeline"])
    L += [
        "",
        "## Autoscaling (min 1, max 2 replicas, target_ongoing_requests 2, upscale 2 s, downscale 8 s)",
        "",
        f"- load: /predict at concurrency {a.scale_concurrency} for {a.scale_load_seconds:.0f} s, then idle;"
        f" {scale['requests']} ok, {scale['failed']} failed, {scale['rps']:.1f} req/s",
        f"- peak replicas {scale['peak']}; scaled up at {fmt(scale['scaled_up_at'])} s;"
        f" load ended at {scale['load_end']:.0f} s; back to 1 replica at {fmt(scale['scaled_down_at'])} s",
        f"- running replicas over time (`serve.status()`, 1 s samples; * = after the load stopped): {tl}",
        "",
        "## Replica killed under load (2 fixed replicas, /predict at concurrency 8)",
        "",
        f"- `ray.kill` of replica actor `{flt['victim']}` at {flt['kill_at']:.1f} s",
        f"- requests: {flt['requests']} sent, {flt['failed']} failed"
        f" (last failure {fmt(flt['last_failure_after'])} s after the kill);"
        f" {flt['served_after_kill']}/{flt['total_after_kill']} served after the kill",
        f"- the controller had a replacement replica RUNNING {fmt(flt['replaced_after'])} s after the kill",
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(L))
    log.info("wrote %s", out)


def fmt(v) -> str:
    return "never" if v is None else f"{v:.1f}"


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", help="artifact dir (default: an untrained small_cnn)")
    p.add_argument("--size", type=int, default=128, help="input size of the default model")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve.md"))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cell-seconds", type=float, default=3.0)
    p.add_argument("--max-requests", type=int, default=200)
    p.add_argument("--scale-concurrency", type=int, default=16)
    p.add_argument("--scale-load-seconds", type=float, default=25.0)
    p.add_argument("--scale-idle-seconds", type=float, default=45.0)
    p.add_argument("--fault-seconds", type=float, default=16.0)
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs for the local Ray")
    p.add_argument("--quick", action="store_true", help="1 repeat, short cells and phases")
    a = p.parse_args(argv)
    if a.quick:
        a.repeats, a.cell_seconds, a.max_requests = 1, 2.0, 60
        a.scale_load_seconds, a.scale_idle_seconds, a.fault_seconds = 15.0, 30.0, 10.0
    return a


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    a = parse_args(argv)
    import ray
    from ray import serve

    t_start = time.perf_counter()
    a.load_start = os.getloadavg()[0]
    tmp = tempfile.TemporaryDirectory(prefix="bench_serve_")
    artifact = Path(a.artifact) if a.artifact else make_artifact(Path(tmp.name) / "artifact", a.size)
    from cxrray.artifact import read_meta

    meta = read_meta(artifact)
    a.model_desc = (f"{meta.architecture} at {meta.preprocess.size} px, {meta.label_space.num_classes} classes"
                    + ("" if a.artifact else " (untrained)"))
    images = upload_images()
    a.upload_kib = statistics.mean(len(b) for b in images) / 1024
    ray.init(num_cpus=a.num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    try:
        rows = latency_matrix(url, artifact, images, a)
        scale = autoscaling(url, artifact, images, a)
        log.info("autoscaling: %s", {k: v for k, v in scale.items() if k != "timeline"})
        flt = fault(url, artifact, images, a)
        log.info("fault: %s", flt)
        write_report(Path(a.out), a, rows, scale, flt, time.perf_counter() - t_start)
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()
    print(Path(a.out).read_text())  # noqa: T201 - the benchmark's output
    return 0


if __name__ == "__main__":
    sys.exit(main())
