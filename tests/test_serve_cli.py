"""The shipped `serve_config.yaml` through Ray's own CLIs, as the README tells users to run it:
`ray start --head` + `serve deploy serve_config.yaml`, and `serve run serve_config.yaml`
(stopped with Ctrl-C). On a head of its own, so it never touches the session's `ray_session`."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml

from clusters import VENV_BIN, free_port, ray_tmp, start_head  # noqa: F401  (ray_tmp: a fixture)
from test_serve import make_artifact, png_bytes

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


# A user's shell starts a command with SIGINT at its default and unblocked, so Ctrl-C raises
# KeyboardInterrupt in it. A test run need not: one started in the background (`... &` in a
# script, nohup) has SIGINT and SIGQUIT ignored in every process, and an ignored or blocked SIGINT
# passes through exec. Two such full runs saw `serve run` still in its sleep loop 300 s after the
# SIGINT (faulthandler's stacks), with the pytest workers' SigIgn at 0x1001007. So the command
# starts from a shell's signal state, as a user's does.
AS_FROM_A_SHELL = ("import os, signal, sys; signal.pthread_sigmask(signal.SIG_SETMASK, set()); "
                   "signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])")


def signal_state() -> str:
    """This process's blocked and ignored signals (hex masks from /proc), for a failure message."""
    status = Path(f"/proc/{os.getpid()}/task/{threading.get_native_id()}/status").read_text().splitlines()
    return ", ".join(line.replace("\t", " ") for line in status if line.startswith(("SigBlk", "SigIgn")))


def config_for(artifact: Path, port: int, out: Path) -> Path:
    """The shipped config with only what a user must change: the artifact (absolute, as the
    file's comment asks for `serve deploy`) and, here, a free port."""
    cfg = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    cfg["http_options"]["port"] = port
    cfg["applications"][0]["args"]["artifact"] = str(artifact)
    out.write_text(yaml.safe_dump(cfg))
    return out


def wait_healthy(url: str, timeout: float = 240) -> None:
    end, last = time.time() + timeout, None
    while time.time() < end:
        try:
            r = requests.get(url + "/healthz", timeout=5)
            if r.status_code == 200:
                return
            last = r.status_code
        except requests.RequestException as e:
            last = e
        time.sleep(1)
    raise AssertionError(f"{url} never became healthy: {last}")


def answers_like_the_artifact(url: str, artifact: Path) -> None:
    """The deployed app serves *this* artifact: same model id and probabilities as the Predictor."""
    from cxrray.predict import Predictor

    data = png_bytes(3)
    r = requests.post(url + "/predict", data=data, headers={"Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    predictor = Predictor(artifact, device="cpu", num_threads=1)
    expected = predictor.describe(predictor.predict_images(predictor.prepare_bytes(data)[None]))[0]
    assert body["model_id"] == expected["model_id"]
    for name, c in expected["classes"].items():
        assert body["classes"][name]["probability"] == pytest.approx(c["probability"], abs=1e-5)


def stopped_answering(url: str, timeout: float = 60) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        try:
            requests.get(url + "/healthz", timeout=2)
        except requests.RequestException:
            return True
        time.sleep(1)
    return False


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("serve_cli") / "artifact")


def test_serve_deploy_and_serve_run_with_the_shipped_config(ray_tmp, tmp_path, artifact):
    head = start_head(ray_tmp)

    def serve_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run([str(VENV_BIN / "serve"), *args], env=head.env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=timeout)

    # 1. `serve deploy` onto the running head (through its dashboard's REST API).
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    deployed = serve_cli("deploy", str(config_for(artifact, port, tmp_path / "deploy.yaml")),
                         "--address", head.dashboard_url)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    wait_healthy(url)
    answers_like_the_artifact(url, artifact)
    status = serve_cli("status", "--address", head.dashboard_url)
    assert "RUNNING" in status.stdout and "CXRServer" in status.stdout, status.stdout + status.stderr
    down = serve_cli("shutdown", "--yes", "--address", head.dashboard_url)
    assert down.returncode == 0, down.stdout + down.stderr
    assert stopped_answering(url)

    # 2. `serve run` in the foreground; Ctrl-C (SIGINT) stops the application and the command.
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve_run.log"
    # Unbuffered, so the log shows how far the command got; faulthandler, so a SIGABRT makes it
    # print every thread's stack there if it does not stop.
    env = {**head.env, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
    run = [str(VENV_BIN / "serve"), "run", str(config_for(artifact, port, tmp_path / "run.yaml")),
           "--address", head.gcs_address]
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", AS_FROM_A_SHELL, *run], env=env, cwd=tmp_path,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(url)
        answers_like_the_artifact(url, artifact)
        proc.send_signal(signal.SIGINT)
        # Serve's own shutdown is bounded (30 s for the controller); the rest is for a loaded machine.
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # faulthandler prints its stacks into the log
            time.sleep(5)
            pytest.fail(f"`serve run` did not stop within 120 s of Ctrl-C (this test process: {signal_state()}); "
                        "its log:\n" + log.read_text()[-6000:])
        assert stopped_answering(url), log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
