"""Resume bookkeeping at CheXpert scale (not a test): results go to benchmarks/results/storage.md.

A scoring job killed near the end of a 223,414-image archive must be able to restart cheaply:
the re-run lists the input, reads the committed parts' image_ids and routes only what is
missing. This measures that restart cost (no model, no Ray) on a local folder and on S3
(moto on loopback), side by side:

    python benchmarks/bench_resume.py --images 223414 --chunk 1024 --rounds 3
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill(out: str, ids: list[str], chunk: int, schema: pa.Schema) -> float:
    """Commit every chunk but the last (a run killed before its final part)."""
    from cxrray.score import PartWriter

    t0 = time.perf_counter()
    done = ids[: len(ids) - chunk]
    w = PartWriter(out, done, chunk, 0, schema, "m1", {})
    for i in range(0, len(done), chunk):
        part = done[i : i + chunk]
        n = len(part)
        cols = {"image_id": part, "path": [f"s3://archive/{x}" for x in part], "model_id": ["m1"] * n,
                "error": pa.nulls(n, pa.string()), "positive": [[] for _ in part]}
        cols.update({c: np.full(n, 0.5, np.float32) for c in schema.names if c.startswith("p_")})
        w.add(pa.table(cols))
    return time.perf_counter() - t0


def restart(out: str, manifest: str, schema: pa.Schema) -> dict:
    from cxrray.score import list_inputs, scan_output
    from cxrray.score.inputs import fingerprint

    t0 = time.perf_counter()
    inputs = list_inputs(manifest)
    t1 = time.perf_counter()
    fingerprint(inputs)
    state = scan_output(out, "m1", schema, force_model=False)
    t2 = time.perf_counter()
    todo = inputs[~inputs["image_id"].isin(state.done)]
    t3 = time.perf_counter()
    return {"list_s": t1 - t0, "scan_s": t2 - t1, "todo_s": t3 - t2, "total_s": t3 - t0, "done": len(state.done),
            "todo": len(todo)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=223_414)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    port = free_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    import boto3
    import pandas as pd
    from moto.server import ThreadedMotoServer

    from cxrray.labels import CHEXPERT_14
    from cxrray.score import output_schema

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="resume")
        schema = output_schema([f"p_{n.lower().replace(' ', '_')}" for n in CHEXPERT_14])
        ids = [f"train/patient{i // 3:05d}/study1/view{i % 3 + 1}_frontal.jpg" for i in range(args.images)]
        with tempfile.TemporaryDirectory() as tmp:
            manifest = os.path.join(tmp, "inputs.parquet")
            pd.DataFrame({"image_id": ids, "path": [f"s3://archive/{x}" for x in ids]}).to_parquet(manifest)
            outs = {"local": os.path.join(tmp, "out"), "s3": "s3://resume/out"}
            fills = {k: fill(v, sorted(ids), args.chunk, schema) for k, v in outs.items()}
            rows = {k: [] for k in outs}
            for _ in range(args.rounds):
                for k, v in outs.items():
                    rows[k].append(restart(v, manifest, schema))
    finally:
        server.stop()
    print(f"# resume bookkeeping, {args.images:,} inputs, chunks of {args.chunk} "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}, "
          f"load {os.getloadavg()[0]:.1f})")
    print("| output | write all parts once | list input | scan committed parts | total restart | done / to do |")
    print("|---|---|---|---|---|---|")
    for k, rs in rows.items():
        med = {m: statistics.median(r[m] for r in rs) for m in ("list_s", "scan_s", "total_s")}
        print(f"| {k} | {fills[k]:.1f} s | {med['list_s']:.2f} s | {med['scan_s']:.2f} s | {med['total_s']:.2f} s | "
              f"{rs[0]['done']:,} / {rs[0]['todo']:,} |")


if __name__ == "__main__":
    main()
