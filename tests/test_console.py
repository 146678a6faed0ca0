"""The console of `cxrray train`, run as a user runs it (a subprocess with its own Ray): cxrray's
lines only, a bounded count, Ray's lines back with -v, a worker's error in full; plus the
progress reporter and the relay rule, which need no Ray."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from clusters import CLI_EPOCHS as EPOCHS, cxrray, train_args
from cxrray.console import Progress, keep_relayed_line
from cxrray.manifest import read_manifest, write_manifest

REPO = Path(__file__).resolve().parents[1]
RAY_LINES = ("PlacementGroupCleaner", "TrainingReport(", "Execution plan", "Starting execution of Dataset")
# A 2-epoch run's own lines: 1 "training ...", 1 per epoch, 1 for Ray's log directory, the
# 3-line human summary and the JSON line: 8, plus ~3 from MLflow tracking: 11. Step progress adds
# one line a CXRRAY_PROGRESS_EVERY_S (30 s) per epoch, 0-2 here on a loaded 2-core machine.
# Before this bound existed the same run printed 55 lines (19 of them PlacementGroupCleaner
# warnings, one a second of training), and a longer run grows by one such line every second.
MAX_LINES = 20


def lines(proc: subprocess.CompletedProcess) -> list[str]:
    return (proc.stdout + proc.stderr).splitlines()


@pytest.mark.ray
@pytest.mark.slow
def test_train_console_shows_cxrrays_lines_only(cli_train_run):
    """conftest's shared run (test_tracking checks what it logged to MLflow)."""
    proc = cli_train_run.proc
    out = lines(proc)
    assert proc.returncode == 0, "\n".join(out)
    assert len(out) <= MAX_LINES, "\n".join(out)
    for noise in RAY_LINES:
        assert not any(noise in ln for ln in out), (noise, "\n".join(out))
    relayed = {m.group(1) for ln in out if (m := re.match(r"\((\S+) pid=", ln))}
    assert relayed <= {"RayTrainWorker"}, "\n".join(out)  # nothing relayed from Ray's own actors
    for epoch in range(1, EPOCHS + 1):
        assert any(re.search(rf"cxrray.train: epoch {epoch}/{EPOCHS} +train_loss", ln) for ln in out), "\n".join(out)
    assert any("Ray's own logs: " in ln for ln in out), "\n".join(out)
    assert proc.stdout.strip().splitlines()[-1].startswith("{")  # --json: still the last stdout line


@pytest.mark.ray
@pytest.mark.slow
def test_verbose_brings_rays_lines_back(cli_data):
    proc = cxrray(cli_data, "-v", *train_args(cli_data, "verbose", "epochs=1"))
    out = "\n".join(lines(proc))
    assert proc.returncode == 0, out
    assert "TrainingReport(" in out and "Starting execution of Dataset" in out, out
    assert "epoch 1/1" in out


@pytest.mark.ray
@pytest.mark.slow
def test_a_workers_error_reaches_the_user(cli_data):
    """Every validation image missing: the train workers raise NoReadableImages after the first
    epoch; its message (and the workers' warnings that lead to it) must not be filtered away.
    (Missing training images stop the run before the workers start: test_train.)"""
    df, space = read_manifest(cli_data / "manifest.parquet")
    valid = df["split"] == "valid"
    df.loc[valid, "path"] = [str(cli_data / "gone" / Path(p).name) for p in df.loc[valid, "path"]]
    broken = write_manifest(df, space, cli_data / "missing.parquet")
    proc = cxrray(cli_data, *train_args(cli_data, "broken", f"manifest={broken}", "epochs=1",
                                        "max_failures=0"))
    out = "\n".join(lines(proc))
    assert proc.returncode != 0, out
    assert "NoReadableImages" in out and "could be read" in out, out
    assert "Traceback" in out  # in full, not one line


def test_progress_logs_every_n_seconds_off_a_terminal(caplog, monkeypatch):
    clock = iter(float(t) for t in range(0, 1000, 10))  # each call: 10 s later
    monkeypatch.setattr("cxrray.console.time.perf_counter", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="cxrray"):
        with Progress("epoch 1/3", 6, unit="steps", rate_unit="img", every_s=25, tty=False) as p:
            for _ in range(6):
                p.update(1, amount=32, loss=0.5)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2, msgs  # at 30 s and 60 s, not every step
    assert re.match(r"epoch 1/3: 3/6 steps \(50%\), 3\.2 img/s, ETA 0:00:30  loss 0\.5", msgs[0]), msgs


def test_progress_with_unknown_total_and_disabled():
    p = Progress("train", None, unit="steps", tty=False, every_s=0, enabled=False)
    p.update(3, amount=96)
    assert p.line().startswith("train: 3 steps, ") and "ETA" not in p.line()


def test_relay_rule_drops_rays_actors_but_not_errors_or_cxrrays_workers():
    assert not keep_relayed_line("PlacementGroupCleaner", "Failed to query Ray Train Controller actor state.")
    assert not keep_relayed_line("TrainController", "Requesting resources: {'CPU': 1} * 2")
    assert keep_relayed_line("TrainController", "Traceback (most recent call last):")
    assert not keep_relayed_line("raylet", "Task ServeController.graceful_shutdown failed. There are infinite "
                                           "retries remaining. Error: The actor is dead because it was killed by `ray.kill`.")
    assert keep_relayed_line("raylet", "Task was killed due to the node running low on memory.")
    assert keep_relayed_line("RayTrainWorker", "2026-01-01 INFO cxrray.train: epoch 1/8  train_loss 0.5")
    assert keep_relayed_line("ServeReplica:cxrray:CXRServer", "WARNING cxrray.predict: unreadable upload")
    assert not keep_relayed_line("ServeReplica:cxrray:CXRServer",
                                 "INFO 2026-12-01 10:31:51,003 cxrray_CXRServer 9ochpv6j 6d -- POST /predict 200 35.0ms")


def test_serve_info_is_hidden_on_the_driver_even_after_serve_reconfigures_it(caplog):
    from cxrray.console import setup_console

    setup_console(False)
    serve_logger = logging.getLogger("ray.serve")
    serve_logger.setLevel(logging.INFO)  # what Serve does when it starts
    with caplog.at_level(logging.INFO):
        serve_logger.info('Started Serve in namespace "serve".')
        serve_logger.warning("a replica failed its health check")
    assert [r.getMessage() for r in caplog.records] == ["a replica failed its health check"]
    setup_console(True)
    assert not serve_logger.filters
    setup_console(False)


NATIVE_NOISE = (b"[2026-12-01 12:32:43,452 E 10534 10534] core_worker.cc:2465: Actor with class name: "
                b"'MapWorker(MapBatches(ContractPredictor))' and ID: '3a15' has constructor arguments in the "
                b"object store and max_restarts > 0. If the arguments in the object store go out of scope or "
                b"are lost, the actor restart will fail.\n")


def test_native_stderr_filter_drops_rays_restart_note_and_keeps_everything_else(capfd):
    """What Ray's C++ core worker writes to fd 2 (os.write is the same system call): the
    restart note goes, any other native line (an error, a partial meter) still arrives in its
    order, Python's own output arrives too (by its own path, so not ordered with the native
    lines), and fd 2 is the real stream again afterwards."""
    from cxrray.native_stderr import filtered_native_stderr

    with filtered_native_stderr():
        os.write(2, b"before\n" + NATIVE_NOISE)
        os.write(2, b"[2026-12-01 12:33:00,000 E 1 1] raylet_client.cc:10: a real native error\n")
        os.write(2, b"meter 50%\r")
        print("python's own line", file=sys.stderr, flush=True)
    os.write(2, b"after\n" + NATIVE_NOISE)
    err = capfd.readouterr().err
    assert "has constructor arguments" in err.split("after\n", 1)[1]  # outside the block: untouched
    inside = err.split("after\n", 1)[0]
    assert "has constructor arguments" not in inside
    for kept in ("before\n", "a real native error\n", "meter 50%\r", "python's own line"):
        assert kept in inside, err
    assert inside.index("before") < inside.index("a real native error") < inside.index("meter 50%")


def test_native_stderr_filter_keeps_pythons_stderr_on_the_real_stream(tmp_path):
    """In a process whose sys.stderr is fd 2 itself (a user's terminal), Python's stream moves
    onto the real stderr (so tqdm still sees a terminal) and only native writes pass the pipe."""
    script = (
        "import os, sys\n"
        "from cxrray.native_stderr import filtered_native_stderr\n"
        "before = os.fstat(2).st_ino\n"
        "with filtered_native_stderr():\n"
        "    assert os.fstat(sys.stderr.fileno()).st_ino == before\n"
        "    assert os.fstat(2).st_ino != before  # native writes: the pipe\n"
        f"    os.write(2, {NATIVE_NOISE!r} + b'native kept\\n')\n"
        "    sys.stderr.write('python kept\\n')\n"
        "assert os.fstat(2).st_ino == before and sys.stderr.fileno() == 2\n"
    )
    with open(tmp_path / "err.txt", "wb") as err:
        proc = subprocess.run([sys.executable, "-c", script], stderr=err, timeout=60, cwd=REPO)
    text = (tmp_path / "err.txt").read_text()
    assert proc.returncode == 0, text
    assert "native kept\n" in text and "python kept\n" in text and "constructor arguments" not in text
