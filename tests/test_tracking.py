"""MLflow tracking and the registry, for real: a Ray Train run is logged to the default SQLite
store under its storage_path, registered with `cxrray register`, loaded and served over HTTP
from its `models:/name@alias` URI. Plus the settings, URI parsing and failure paths, no Ray."""
from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import pytest
import requests

from clusters import free_port
from cxrray import storage, tracking
from cxrray.config import TrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "jobs" / "configs" / "synthetic_demo.yaml"
MODEL = "cxrray-test"


def demo_config(tmp: Path, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, DEMO_CONFIG, [f"root={tmp / 'syn'}", f"manifest={tmp / 'manifest.parquet'}",
                                                  f"storage_path={tmp / 'runs'}", *overrides])


# ------------------------------------------------------------------------------ no Ray


def test_default_store_is_sqlite_under_a_local_storage_path(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = demo_config(tmp_path)
    assert tracking.tracking_uri_for(cfg) == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert tracking.tracking_uri_for(demo_config(tmp_path, "tracking_uri=http://mlflow:5000")) == "http://mlflow:5000"
    assert tracking.tracking_uri_for(demo_config(tmp_path, "tracking=false")) is None
    # SQLite cannot live on S3: off unless a store is named, and then it is used.
    assert tracking.tracking_uri_for(demo_config(tmp_path, "storage_path=s3://b/runs")) is None
    assert tracking.start(demo_config(tmp_path, "storage_path=s3://b/runs"), "s3://b/runs/demo") is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////shared/m.db")
    assert tracking.tracking_uri_for(demo_config(tmp_path, "storage_path=s3://b/runs")) == "sqlite:////shared/m.db"


def test_registry_uris_are_recognised_even_after_normalize() -> None:
    assert tracking.parse_model_uri("models:/cxrray-chexpert/3") == ("cxrray-chexpert", "3", None)
    assert tracking.parse_model_uri("models:/cxrray-chexpert@production") == ("cxrray-chexpert", None, "production")
    with pytest.raises(tracking.RegistryError, match="models:/NAME/VERSION"):
        tracking.parse_model_uri("models:/a/b/c")
    # ServeArgs and the scorer normalize the artifact path: the URI must survive that.
    assert tracking.model_uri(storage.normalize("models:/n@production")) == "models:/n@production"
    assert tracking.model_uri("models:/n/3") == "models:/n/3"
    assert tracking.model_uri("/data/my-models:/x") is None and tracking.model_uri("runs/x/artifacts/best") is None


def test_resolution_without_a_store_says_what_to_set(monkeypatch) -> None:
    from cxrray.artifact import read_meta

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(tracking.RegistryError, match="MLFLOW_TRACKING_URI"):
        read_meta("models:/x@production")


def test_a_failing_store_never_stops_training(tmp_path, caplog) -> None:
    (tmp_path / "file").write_text("a file where the store's folder should be")
    cfg = demo_config(tmp_path, f"tracking_uri=sqlite:///{tmp_path}/file/m.db")
    with caplog.at_level(logging.WARNING, logger="cxrray.tracking"):
        assert tracking.start(cfg, str(tmp_path / "runs" / "demo")) is None
    assert "tracking disabled" in caplog.text
    bad = {"uri": f"sqlite:///{tmp_path}/file/m.db", "run_id": "nope"}
    tracking.log_epoch(bad, {"epoch": 1, "train_loss": 0.5})  # a warning, no exception
    tracking.finish(bad, str(tmp_path / "runs" / "demo"))


def test_a_rerun_continues_the_same_mlflow_run(tmp_path, monkeypatch) -> None:
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = demo_config(tmp_path)
    run_dir = cfg.run_dir
    first = tracking.start(cfg, run_dir)
    tracking.log_epoch(first, {"epoch": 1, "train_loss": 0.7, "val_mean_auroc": None})
    again = tracking.start(demo_config(tmp_path, "epochs=12"), run_dir)  # resumed with more epochs
    assert again["run_id"] == first["run_id"]
    run = MlflowClient(first["uri"]).get_run(first["run_id"])
    assert run.data.params["epochs"] == "8" and run.data.tags["resumed.epochs"] == "12"
    assert run.data.metrics["train_loss"] == 0.7 and "val_mean_auroc" not in run.data.metrics
    assert storage.read_json(storage.join(run_dir, "tracking.json"))["run_id"] == first["run_id"]
    other = tracking.start(demo_config(tmp_path, "run_name=other"), demo_config(tmp_path, "run_name=other").run_dir)
    assert other["run_id"] != first["run_id"]


def test_register_any_artifact_then_load_it_from_the_registry(tmp_path, monkeypatch, capsys) -> None:
    """--artifact: logged into a new run (artifacts beside the SQLite file, not in the cwd)."""
    import torch

    from cxrray.artifact import load_artifact
    from cxrray.cli import main
    from test_serve import make_artifact

    artifact = make_artifact(tmp_path / "artifact")
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    assert main(["register", "--artifact", str(artifact), "--name", "any", "--alias", "prod",
                 "--tracking-uri", uri, "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["uri"] == "models:/any/1" and res["source"].startswith(str(tmp_path / "store" / "mlruns"))
    assert not (tmp_path / "mlruns").exists()
    storage.check_store("models:/any@prod", what="--artifact")  # the scorer's preflight lets it through
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model, meta = load_artifact(artifact)
    again, meta2 = load_artifact("models:/any@prod")
    assert meta2.model_id == meta.model_id == res["model_id"]
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------ a real run


@pytest.fixture(scope="module")
def tracked(cli_train_run) -> dict:
    """conftest's `cxrray train` subprocess (whose console test_console checks): the demo config
    at 32 px, tiny_cnn, 2 epochs, 2 workers, through Ray Train with the default tracking (no
    MLFLOW_TRACKING_URI in its environment)."""
    from cxrray.artifact import read_meta
    from cxrray.train import TrainResult

    proc = cli_train_run.proc
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    # What `train` returns: its --json line is that result without the history, which is the last artifact's.
    result = TrainResult(**summary, history=read_meta(summary["last_artifact"]).summary["history"])
    cfg = load_config(TrainConfig, DEMO_CONFIG, cli_train_run.overrides)
    return {"cfg": cfg, "result": result, "uri": f"sqlite:///{Path(cfg.resolved_storage()) / 'mlflow.db'}"}


@pytest.mark.ray
@pytest.mark.slow
def test_the_run_is_in_mlflow_with_params_metrics_plots_and_artifact(tracked) -> None:
    from mlflow import MlflowClient

    from cxrray.artifact import read_meta

    client = MlflowClient(tracked["uri"])
    exp = client.get_experiment_by_name("cxrray")
    assert exp.artifact_location == str(Path(tracked["cfg"].resolved_storage()) / "mlruns")  # inside storage
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "cli" and run.info.status == "FINISHED"
    assert run.data.params["model"] == "tiny_cnn" and float(run.data.params["lr"]) == tracked["cfg"].lr
    assert run.data.params["uncertainty.default"] == "U-Ones" and int(run.data.params["data.n_train"]) > 0
    history = client.get_metric_history(run.info.run_id, "val_mean_auroc")
    assert [m.step for m in history] == [1, 2]
    assert [m.value for m in history] == pytest.approx([r["val_mean_auroc"] for r in tracked["result"].history])
    assert {m.step for m in client.get_metric_history(run.info.run_id, "train_loss")} == {1, 2}
    assert any(k.startswith("val_auroc.") for k in run.data.metrics)
    files = {f.path for f in client.list_artifacts(run.info.run_id, "best")}
    assert files == {"best/model.json", "best/model.pt"}
    plots = {f.path for f in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/roc_curves.png", "plots/training_curves.png"}
    assert run.data.tags["model_id"] == read_meta(tracked["result"].best_artifact).model_id
    assert run.data.tags["cxrray.run_dir"] == tracked["result"].run_dir


@pytest.fixture(scope="module")
def registered(tracked) -> dict:
    from cxrray.cli import main

    def register() -> dict:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["register", "--run-dir", tracked["result"].run_dir, "--name", MODEL,
                         "--alias", "production", "--json"]) == 0
        return json.loads(out.getvalue().strip().splitlines()[-1])

    first = register()
    return {"first": first, "again": register()}


@pytest.mark.ray
@pytest.mark.slow
def test_register_makes_a_version_with_alias_and_model_id(tracked, registered) -> None:
    from mlflow import MlflowClient

    from cxrray.artifact import read_meta

    res = registered["first"]
    model_id = read_meta(tracked["result"].best_artifact).model_id
    assert res["uri"] == f"models:/{MODEL}/1" and res["alias_uri"] == f"models:/{MODEL}@production"
    assert res["model_id"] == model_id and res["tracking_uri"] == tracked["uri"]
    assert registered["again"]["version"] == 1  # the same model_id reuses its version
    client = MlflowClient(tracked["uri"])
    mv = client.get_model_version_by_alias(MODEL, "production")
    assert int(mv.version) == 1 and mv.tags["model_id"] == model_id and mv.run_id == res["run_id"]


@pytest.mark.ray
@pytest.mark.slow
def test_a_registry_uri_loads_the_same_model(tracked, registered, monkeypatch) -> None:
    import torch

    from cxrray.artifact import load_artifact, localize, read_meta

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked["uri"])
    model, meta = load_artifact(tracked["result"].best_artifact)
    x = torch.randn(3, meta.preprocess.channels, meta.preprocess.size, meta.preprocess.size)
    for uri in (f"models:/{MODEL}@production", f"models:/{MODEL}/1", f"models:/{MODEL}/latest",
                storage.normalize(f"models:/{MODEL}@production")):
        again, meta2 = load_artifact(uri)
        assert meta2.model_id == meta.model_id
        with torch.no_grad():
            torch.testing.assert_close(again(x), model(x))
    assert read_meta(f"models:/{MODEL}@production").model_id == meta.model_id
    assert (localize(f"models:/{MODEL}@production") / "model.pt").is_file()
    with pytest.raises(tracking.RegistryError, match="not found"):
        read_meta(f"models:/{MODEL}@staging")


@pytest.mark.ray
@pytest.mark.slow
def test_serve_from_the_registry_answers_like_the_predictor(tracked, registered, monkeypatch) -> None:
    from ray import serve

    from cxrray.predict import Predictor
    from cxrray.serve import run_server
    from test_serve import png_bytes

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked["uri"])
    # Replicas resolve the URI themselves: the store goes into their environment.
    env = {"runtime_env": {"env_vars": {"MLFLOW_TRACKING_URI": tracked["uri"]}}, "num_cpus": 1}
    url = run_server(f"models:/{MODEL}@production", port=free_port(), blocking=False, num_replicas=1,
                     name="test_tracking", route_prefix="/registry", num_threads=1,
                     deployment={"ray_actor_options": env})
    try:
        data = png_bytes(4)
        r = requests.post(url + "/predict", data=data, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        predictor = Predictor(tracked["result"].best_artifact, device="cpu", num_threads=1)
        expected = predictor.describe(predictor.predict_images(predictor.prepare_bytes(data)[None]))[0]
        assert body["model_id"] == expected["model_id"] == registered["first"]["model_id"]
        for name, c in expected["classes"].items():
            assert body["classes"][name]["probability"] == pytest.approx(c["probability"], abs=1e-5)
    finally:
        serve.delete("test_tracking")
