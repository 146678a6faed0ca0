"""Shared fixtures: the real-data folder, one local Ray cluster per test session, a moto S3
server, and one `cxrray train` subprocess run that two test modules check."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Test clusters are throwaway and local: no token auth (it stays on for real use).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


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
