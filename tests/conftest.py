"""Shared fixtures: the real-data folder and one local Ray cluster per test session."""
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
