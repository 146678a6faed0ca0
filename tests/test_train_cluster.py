"""Training on clusters of their own, each driven from a subprocess so it never meets the
session's `ray_session`: a simulated two-node cluster that loses a worker mid-run, and a
`ray start` head that runs `jobs/train.py` through `ray job submit`."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from clusters import VENV_BIN, cluster_env, ray_tmp, start_head  # noqa: F401  (ray_tmp: a fixture)
from cxrray.sources.synthetic import SynthConfig, write_synthetic_chexpert

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "jobs" / "configs" / "synthetic_demo.yaml"


def _tiny_data(tmp: Path, n_patients: int = 60) -> tuple[Path, Path]:
    """(synthetic root, manifest path to be built by `train`): small and quick at 32 px."""
    write_synthetic_chexpert(tmp / "syn", SynthConfig(n_patients=n_patients, size=32, seed=5), progress=False)
    return tmp / "syn", tmp / "manifest.parquet"


# --------------------------------------------------------------------------- two nodes, one worker lost

FAULT_SCRIPT = textwrap.dedent('''
    """Driver: a 2-node Cluster, training spread over both, one worker SIGKILLed after the first checkpoint."""
    import json, os, signal, sys, threading, time
    from pathlib import Path

    import ray
    from ray._private import state
    from ray.cluster_utils import Cluster

    from cxrray.config import TrainConfig, load_config
    from cxrray.train import train

    args = json.loads(sys.argv[1])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    second = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    cfg = load_config(TrainConfig, args["config"], args["overrides"])

    def workers():
        return [a for a in state.actors().values() if a["ActorClassName"] == "RayTrainWorker"]

    seen = {}

    def registered_checkpoint():
        # Ray writes this snapshot once the controller has registered a reported checkpoint (the
        # checkpoint_* folder alone appears while it is still being copied).
        try:
            snapshot = json.loads((Path(cfg.run_dir) / "checkpoint_manager_snapshot.json").read_text())
        except (OSError, ValueError):
            return False
        return bool(snapshot.get("latest_checkpoint_result"))

    def kill_one_after_first_checkpoint():
        end = time.time() + 600
        while time.time() < end and not registered_checkpoint():
            time.sleep(0.05)
        alive = [a for a in workers() if a["State"] == "ALIVE"]
        seen["nodes"] = sorted({a["Address"]["NodeID"] for a in alive})
        victim = next(a for a in alive if a["Address"]["NodeID"] == second.node_id)
        seen["killed"] = {"pid": victim["Pid"], "node": victim["Address"]["NodeID"],
                          "checkpoints": len(list(Path(cfg.run_dir).glob("checkpoint_*")))}
        os.kill(victim["Pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_one_after_first_checkpoint, daemon=True)
    killer.start()
    res = train(cfg)
    killer.join(timeout=5)
    summary = {"history": res.history, "epochs_done": res.epochs_done, "best": str(res.best_artifact),
               "last": str(res.last_artifact), "workers_started": len(workers()),
               "node_ids": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]), "seen": seen}
    ray.shutdown()
    cluster.shutdown()
    print("RESULT " + json.dumps(summary), flush=True)
''')


def test_two_nodes_lose_a_worker_and_training_resumes_from_its_checkpoint(tmp_path, ray_tmp):
    from cxrray.artifact import load_artifact

    root, manifest = _tiny_data(tmp_path)
    epochs = 3
    overrides = [f"root={root}", f"manifest={manifest}", f"storage_path={tmp_path / 'runs'}", "run_name=fault",
                 "image_size=32", f"epochs={epochs}", "num_workers=2", "cpus_per_worker=1",
                 "placement_strategy=STRICT_SPREAD", "max_failures=2", "split=[0.6,0.4,0.0]"]
    script = tmp_path / "fault_driver.py"
    script.write_text(FAULT_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), json.dumps({"config": str(DEMO_CONFIG),
                                                                      "overrides": overrides})],
                          cwd=tmp_path, env=cluster_env(ray_tmp), capture_output=True, text=True, timeout=540)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    seen = result["seen"]
    # Placement: one worker on each node of the two.
    assert len(result["node_ids"]) == 2 and seen["nodes"] == result["node_ids"], result
    assert seen["killed"]["checkpoints"] >= 1
    # The lost worker was replaced (a second worker group) and training went on from the checkpoint,
    # not from scratch: each epoch appears exactly once.
    assert result["workers_started"] >= 4, result
    assert "resumed from checkpoint after epoch" in log, log[-5000:]
    assert [r["epoch"] for r in result["history"]] == list(range(1, epochs + 1))
    assert result["epochs_done"] == epochs
    for art in (result["best"], result["last"]):
        model, meta = load_artifact(art)
        assert meta.summary["epochs"] >= 1 and meta.config["placement_strategy"] == "STRICT_SPREAD"


# --------------------------------------------------------------------------- ray job submit

def test_ray_job_submit_trains_and_writes_a_loadable_artifact(tmp_path, ray_tmp):
    from cxrray.artifact import load_artifact

    root, manifest = _tiny_data(tmp_path)
    head = start_head(ray_tmp)
    env, address = head.env, head.dashboard_url

    def ray_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(VENV_BIN / "ray"), *args], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)

    job_id = f"cxrray-train-{uuid.uuid4().hex[:8]}"
    storage = tmp_path / "runs"
    submit = ray_cli("job", "submit", "--address", address, "--submission-id", job_id, "--no-wait",
                     "--working-dir", ".",
                     "--runtime-env-json", json.dumps({"excludes": [".venv", ".git", "runs", "demo_out",
                                                                    "benchmarks", "*.egg-info"]}),
                     "--", "python", "jobs/train.py", "--config", str(DEMO_CONFIG), f"root={root}",
                     f"manifest={manifest}", f"storage_path={storage}", "run_name=job", "image_size=32",
                     "epochs=1", "max_steps_per_epoch=3", "split=[0.6,0.4,0.0]", "--json")
    assert submit.returncode == 0, submit.stdout + submit.stderr
    # `ray job status` ends with "Job '<id>' succeeded" / "failed" / "was stopped" once it is over.
    final = re.compile(rf"Job '{job_id}' (succeeded|failed|was stopped)")
    status, end = None, time.time() + 420
    while status is None and time.time() < end:
        out = ray_cli("job", "status", "--address", address, job_id)
        status = final.search(out.stdout + out.stderr)
        time.sleep(0 if status else 3)
    logs = ray_cli("job", "logs", "--address", address, job_id).stdout
    assert status and status.group(1) == "succeeded", f"job {job_id}: {status and status.group(0)}\n{logs[-5000:]}"
    # `--json`: the driver's last JSON line on stdout is its summary (Ray may log after it).
    summary = next(json.loads(line) for line in reversed(logs.splitlines()) if line.startswith('{"run_dir"'))
    assert summary["epochs_done"] == 1 and Path(summary["best_artifact"]).is_relative_to(storage)
    model, meta = load_artifact(summary["best_artifact"])
    assert meta.architecture == "small_cnn" and meta.summary["epochs"] == 1
    assert meta.preprocess.size == 32 and (storage / "job" / "config.yaml").exists()
