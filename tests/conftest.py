"""Shared fixtures: the real-data folder, one local Ray cluster per test session, a moto S3
server, and one `cxrray train` subprocess run that two test modules check."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Test clusters are throwaway and local: no token auth (it stays on for real use).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray starts its workers at niceness 15: beside a test process that computes in-process (the
# pointing game's training on the other xdist worker), every Ray task and actor of the suite got a
# thirtieth of a core, and a 3 s scoring test took 104 s. At 0 they share the cores fairly. Every
# cluster the suite starts (ray.init, `ray start`, CLI subprocesses) inherits this.
os.environ.setdefault("RAY_worker_niceness", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


# --- two test processes (pytest-xdist) --------------------------------------------------------------
# scripts/test.sh runs the suite on xdist workers, one test file per worker at a time, so a
# module's fixtures (a trained model, a cluster) are built once. Most of the suite's time is Ray
# starting processes and tests waiting on them, which leaves a 2-core machine half idle with one
# process. The files that check one session fixture's work share a worker. The item order below
# (longest files first) is what one process runs; xdist still hands files out by test count, most
# first: handing them out longest first put every heavy Ray file beside the pointing game's
# in-process training, which then got ~12% of a core (still training after 25 min).
#
# The files that start Ray processes of their own (`ray start` nodes, `cxrray` subprocesses with a
# local Ray, `ray job submit`) also share one worker, so they run one after another. Two of them at
# once, each beside its worker's session cluster, filled the 24 GiB machine (2026-12-07, -n 2, main
# 55b623d: the raylet OOM-killed a two-node run's workers at 22.4 of 23.5 GB, and under that memory
# pressure the suite took 70 min with 6 failures, against 31 min passing on a quieter run). The
# session-cluster files (ray_session: one Ray per worker) and the in-process training share the
# other worker and the queue.
OWN_CLUSTERS = "own_clusters"
SHARED_WORKER = {name: OWN_CLUSTERS for name in (
    "test_console.py", "test_tracking.py",  # conftest's cli_train_run and two more `cxrray train` runs
    "test_multinode.py",  # `ray start` head + node, raylet killed and restarted
    "test_train_cluster.py",  # a simulated two-node cluster; `ray job submit` to a `ray start` head
    "test_serve_cli.py",  # `serve deploy` / `serve run` on a `ray start` head
)}
# Seconds of a quiet one-process run (2 cores, 2026-12-01), longest first; the rest follow in order.
LONGEST_FIRST = ("test_explain.py",  # ~350: the pointing game's training
                 "test_train.py",  # ~270
                 "test_s3.py",  # ~210
                 "test_console.py", "test_tracking.py",  # ~200 with their shared run
                 "test_train_cluster.py",  # ~165
                 "test_demo.py",  # ~140
                 "test_score.py",  # ~130
                 "test_multinode.py",  # ~120
                 "test_ensemble.py")  # ~90


def pytest_collection_modifyitems(items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file keeps its order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadFileScheduling

    class FilesTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = super()._split_scope(nodeid)
            return SHARED_WORKER.get(Path(file).name, file)

    return FilesTogether(config, log)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout; real-data tests skip with a reason when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data is absent ({SHARED_DATA}): real chest X-rays ship only to the team's machines")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole session (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=int(os.environ.get("CXRRAY_TEST_CPUS", "4")),
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    # Keep Ray Data quiet and deterministic enough for tests.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # noqa: BLE001 - Serve may never have started
        pass
    ray.shutdown()


# --- one `cxrray train` run, as a user runs it ---------------------------------------------------------
# A subprocess with its own local Ray. test_console checks what it printed, test_tracking what it
# logged to MLflow (the default SQLite store) and what the registry makes of it: one run for both,
# where a second Ray Train run of the same kind cost the suite ~23 s on a 2-core machine.
@pytest.fixture(scope="session")
def cli_data(tmp_path_factory) -> Path:
    """60 synthetic patients at 32 px (~65 train / 15 valid images) and the manifest that
    `cxrray train` would build from the demo config's source/root."""
    from clusters import DEMO_CONFIG
    from cxrray.config import TrainConfig, load_config
    from cxrray.sources.synthetic import SynthConfig, write_synthetic_chexpert
    from cxrray.train import ensure_manifest

    tmp = tmp_path_factory.mktemp("cli")
    write_synthetic_chexpert(tmp / "syn", SynthConfig(n_patients=60, size=32, seed=0), progress=False)
    ensure_manifest(load_config(TrainConfig, DEMO_CONFIG, [f"root={tmp / 'syn'}",
                                                           f"manifest={tmp / 'manifest.parquet'}"]))
    return tmp


@pytest.fixture(scope="session")
def cli_train_run(cli_data):
    """`cxrray train ... --json` on cli_data: tiny_cnn, 32 px, 2 workers, CLI_EPOCHS epochs, the
    demo config's default tracking."""
    from clusters import DEMO_CONFIG, TrainRun, cxrray, train_overrides

    overrides = train_overrides(cli_data, "cli")
    return TrainRun(overrides, cxrray(cli_data, "train", "--config", str(DEMO_CONFIG), *overrides, "--json"))


# --- a real S3 server (moto's server mode) ----------------------------------------------------------
# The endpoint goes into the environment at import, before any Ray cluster starts, so every Ray
# worker, `ray start` node and CLI subprocess of the session inherits it, as they would inherit
# a real deployment's AWS settings. The server itself starts on first use.
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_PORT = _free_port()
S3_ENDPOINT = f"http://127.0.0.1:{S3_PORT}"
os.environ.update(AWS_ENDPOINT_URL=S3_ENDPOINT, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                  AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1; skips (with the reason) where moto is not installed."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        pytest.skip(f"moto[server] is not installed ({e}); `bash scripts/test.sh` installs it")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    yield S3_ENDPOINT
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request) -> str:
    """A fresh, empty bucket per test: s3://<name>."""
    import re
    import uuid

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:6]
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"
