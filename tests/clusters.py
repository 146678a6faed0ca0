"""Helpers for tests that run a Ray cluster of their own beside the session's `ray_session`
(a `ray start` head, a simulated multi-node cluster, a `cxrray train` subprocess with its own
local Ray): free ports, a private temp dir, an environment that keeps the two apart, and
stopping exactly this cluster's processes."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "jobs" / "configs" / "synthetic_demo.yaml"
CLI_EPOCHS = 2  # of conftest's cli_train_run


def cxrray(cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`cxrray [args]` in a fresh process, with the environment a user has (no pytest, no TTY).
    No MLFLOW_TRACKING_URI: a run tracks to the default SQLite store under its storage_path."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"RAY_AUTH_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "cxrray.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def train_overrides(data: Path, name: str, *overrides: str) -> list[str]:
    """The demo config over conftest's `cli_data`: tiny_cnn at 32 px, 2 workers, CLI_EPOCHS. Each
    run `name` has a storage_path (so an MLflow store) of its own."""
    return [f"root={data / 'syn'}", f"manifest={data / 'manifest.parquet'}", f"storage_path={data / 'runs' / name}",
            f"run_name={name}", f"epochs={CLI_EPOCHS}", "num_workers=2", "model=tiny_cnn", "image_size=32", *overrides]


def train_args(data: Path, name: str, *overrides: str) -> list[str]:
    return ["train", "--config", str(DEMO_CONFIG), *train_overrides(data, name, *overrides)]


@dataclass(frozen=True)
class TrainRun:
    """A finished `cxrray train` subprocess and the config overrides it ran with."""
    overrides: list[str]
    proc: subprocess.CompletedProcess


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports: every socket stays bound until all are picked, since the kernel
    may hand a just-released port out again (Ray refuses a node whose components share one)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture
def ray_tmp():
    """A short private Ray temp dir (Unix socket paths must stay under ~107 characters); as
    RAY_TMPDIR it also keeps the cluster's address file away from other clusters' /tmp/ray."""
    path = Path(tempfile.mkdtemp(prefix="cxr", dir="/tmp"))
    yield path
    kill_processes_under(path)
    shutil.rmtree(path, ignore_errors=True)


def kill_processes_under(temp_dir: Path) -> None:
    """Stop the Ray processes of *this* cluster only: every Ray process names its temp/session
    dir on its command line. (`ray stop` would stop every cluster on the machine.)"""
    me = os.getpid()
    for _ in range(2):
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == me:
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if str(temp_dir).encode() in cmdline:
                pids.append(int(proc.name))
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


def cluster_env(ray_tmp: Path) -> dict[str, str]:
    return {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_AUTH_MODE": "disabled",
            # the head's (and so the job's) `python` is this venv's
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0"}


@dataclass(frozen=True)
class Head:
    gcs_address: str  # for ray.init / `serve run --address`
    dashboard_url: str  # for `ray job` and `serve deploy`
    env: dict


NODE_PORT_FLAGS = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                   "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port")
HEAD_PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port")


def _ports(flags: tuple[str, ...]) -> dict[str, int]:
    return dict(zip(flags, free_ports(len(flags))))


def start_head(ray_tmp: Path, num_cpus: int = 4, resources: dict | None = None) -> Head:
    """`ray start --head` on 127.0.0.1 with every port free-picked (nothing collides with the
    session cluster or a neighbour's), dashboard on loopback. Stopped by the ray_tmp fixture."""
    env = cluster_env(ray_tmp)
    ports = _ports(HEAD_PORT_FLAGS + NODE_PORT_FLAGS)
    gcs, dash = ports["--port"], ports["--dashboard-port"]
    extra = [f"--resources={json.dumps(resources)}"] if resources else []
    start = subprocess.run([str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
                            f"--num-cpus={num_cpus}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                            f"--temp-dir={ray_tmp}", "--disable-usage-stats", *extra,
                            *[f"{k}={v}" for k, v in ports.items()]],
                           env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    return Head(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", env)


def start_node(head: Head, temp_dir: Path, num_cpus: int, resources: dict | None = None) -> None:
    """A second node: its own `ray start --address` processes, own temp dir, own CPUs and a
    custom resource, on loopback. Stop it with kill_processes_under(temp_dir)."""
    extra = [f"--resources={json.dumps(resources)}"] if resources else []
    start = subprocess.run([str(VENV_BIN / "ray"), "start", f"--address={head.gcs_address}",
                            "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
                            "--disable-usage-stats", *extra, *[f"{k}={v}" for k, v in _ports(NODE_PORT_FLAGS).items()]],
                           env={**head.env, "RAY_TMPDIR": str(temp_dir)}, capture_output=True, text=True,
                           timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr


def pids_under(temp_dir: Path, name: str = "") -> list[int]:
    """Processes whose command line names `temp_dir` (and `name`, e.g. 'raylet')."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if str(temp_dir).encode() in cmdline and name.encode() in cmdline:
            out.append(int(proc.name))
    return out
