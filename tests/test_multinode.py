"""A real two-node Ray cluster on loopback: `ray start --head` and `ray start --address`, each
its own processes with their own temp dir, CPUs and a custom resource. Training puts one
worker on each node (STRICT_SPREAD) with storage on the moto S3; the second node's raylet is
SIGKILLed mid-run and started again; the run resumes from its last checkpoint in S3 and
finishes; a fresh process then scores with the artifact read from S3. Every process the test
started is stopped by pid."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from clusters import kill_processes_under, pids_under, ray_tmp, start_head, start_node  # noqa: F401
from cxrray import storage
from cxrray.sources.synthetic import SynthConfig, write_synthetic_chexpert

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "jobs" / "configs" / "synthetic_demo.yaml"

DRIVER = textwrap.dedent('''
    import json, sys
    import ray
    from cxrray.config import TrainConfig, load_config
    from cxrray.train import train

    args = json.loads(sys.argv[1])
    ray.init(address=args["address"])
    res = train(load_config(TrainConfig, args["config"], args["overrides"]))
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    print("RESULT " + json.dumps({**res.to_dict(), "alive_nodes": nodes}), flush=True)
''')


def raylet_pids(temp_dir: Path) -> list[int]:
    out = []
    for pid in pids_under(temp_dir, "raylet"):
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if argv0.endswith(b"/raylet"):
            out.append(pid)
    return out


@pytest.fixture
def node_b_tmp():
    path = Path(tempfile.mkdtemp(prefix="cxrb", dir="/tmp"))
    yield path
    kill_processes_under(path)


def test_two_real_nodes_lose_a_raylet_resume_from_s3_and_score_from_s3(s3_bucket, ray_tmp, node_b_tmp, tmp_path):
    syn = write_synthetic_chexpert(tmp_path / "syn", SynthConfig(n_patients=80, size=32, seed=7), progress=False)
    data = f"{s3_bucket}/data/CheXpert-v1.0-small"
    storage.upload_dir(syn.root, data)
    head = start_head(ray_tmp, num_cpus=3, resources={"node_a": 1})
    start_node(head, node_b_tmp, num_cpus=2, resources={"node_b": 1})
    run = f"{s3_bucket}/runs/mn"
    epochs = 4
    overrides = [f"root={data}", f"manifest={s3_bucket}/manifest.parquet", f"storage_path={s3_bucket}/runs",
                 "run_name=mn", "image_size=32", f"epochs={epochs}", "num_workers=2", "cpus_per_worker=1",
                 "model=tiny_cnn", "placement_strategy=STRICT_SPREAD", "max_failures=3", "split=[0.6,0.4,0.0]",
                 f"ray_address={head.gcs_address}"]
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {**head.env, "PYTHONPATH": str(REPO)}
    with open(tmp_path / "driver.log", "wb") as log:
        driver = subprocess.Popen([sys.executable, str(script), json.dumps(
            {"address": head.gcs_address, "config": str(DEMO_CONFIG), "overrides": overrides})],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Kill node B's raylet once a checkpoint is registered in S3 (Ray writes this snapshot
        # after the controller has taken a reported checkpoint).
        end = time.time() + 420
        while True:
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-4000:]
            assert time.time() < end, "no checkpoint reached S3"
            try:
                snap = storage.read_json(f"{run}/checkpoint_manager_snapshot.json")
                if snap.get("latest_checkpoint_result"):
                    break
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.2)
        victims = raylet_pids(node_b_tmp)
        assert len(victims) == 1, victims
        os.kill(victims[0], signal.SIGKILL)
        time.sleep(3)
        kill_processes_under(node_b_tmp)  # what the raylet leaves behind (workers die with it, stragglers by pid)
        start_node(head, node_b_tmp, num_cpus=2, resources={"node_b": 1})
        assert driver.wait(timeout=600) == 0, (tmp_path / "driver.log").read_text()[-6000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    log = (tmp_path / "driver.log").read_text()
    result = json.loads(next(x for x in log.splitlines() if x.startswith("RESULT "))[7:])
    assert "resumed from checkpoint after epoch" in log, log[-6000:]
    assert [r["epoch"] for r in result["history"]] == list(range(1, epochs + 1))  # each epoch once
    assert result["run_dir"] == run and result["best_artifact"] == f"{run}/artifacts/best"
    assert len(result["alive_nodes"]) == 2
    assert any(r.startswith("checkpoint_") for r, _ in storage.list_files(run))

    # A fresh process scores with the artifact read from S3, on the same cluster.
    score = subprocess.run([sys.executable, str(REPO / "jobs" / "score.py"), "--artifact", result["best_artifact"],
                            "--input", f"{data}/valid", "--out", f"{s3_bucket}/scores", "--ray-address",
                            head.gcs_address, "--actors", "2", "--json"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert score.returncode == 0, score.stdout[-3000:] + score.stderr[-3000:]
    summary = json.loads(score.stdout.strip().splitlines()[-1])
    assert summary["complete"] and summary["errors"] == 0 and summary["rows"] == summary["images"] > 0
