"""Experiment tracking and the model registry, on MLflow. All of cxrray's MLflow code is here.

    driver   start(cfg, run_dir)         -> a small handle (tracking URI, run id), or None when off
    rank 0   log_epoch(handle, row, ...)  per-epoch metrics (step = epoch), the best epoch's ROC plot
    driver   finish(handle, run_dir)     the best artifact, config and training curves; status
    CLI      register(name, ...)         a model version whose source is the logged artifact
    anyone   resolve_model_uri(uri)      models:/name/3 or models:/name@alias -> the artifact's location

The default store needs no server: `sqlite:///<storage_path>/mlflow.db`, artifacts in
`<storage_path>/mlruns`. An SQLite file cannot live on an object store, so with an `s3://`
storage_path tracking is off unless `tracking_uri=` (or MLFLOW_TRACKING_URI) names a store.
The run is keyed by its run dir (a tag), so a resumed or re-run training continues the same
MLflow run. Tracking never stops training: a failing store costs a warning, not the job.

Resolving a registry URI needs to know the store: `tracking_uri=`, else MLFLOW_TRACKING_URI.
Serve replicas and scoring actors resolve it themselves, so the variable must be in their
environment (set before `ray start`/`cxrray serve`, or in serve_config.yaml's runtime_env).
mlflow is imported only inside functions: `import cxrray.serve` stays light.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cxrray import __version__, storage

log = logging.getLogger(__name__)

DB_NAME = "mlflow.db"
ARTIFACT_ROOT = "mlruns"
BREADCRUMB = "tracking.json"  # in the run dir: which store and run it was logged to (for `cxrray register`)
ARTIFACT_PATH = "best"  # where the best artifact sits inside the MLflow run
RUN_DIR_TAG = "cxrray.run_dir"
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))/?$")
_disabled: set[str] = set()  # run ids whose logging failed once on this process: not retried every epoch


class RegistryError(ValueError):
    """A registry URI that cannot be resolved, or a registration that cannot be made."""


# ------------------------------------------------------------------------------------ settings


def default_tracking_uri(storage_path: str) -> str | None:
    """sqlite:///<storage_path>/mlflow.db for a local storage_path; None for a URI one."""
    root = storage.normalize(storage_path)
    if storage.is_uri(root):
        return None
    return "sqlite:///" + str(Path(root) / DB_NAME)  # an absolute path: sqlite:////abs/mlflow.db


def tracking_uri_for(cfg) -> str | None:
    """cfg.tracking_uri, else MLFLOW_TRACKING_URI, else the default store under storage_path."""
    if not cfg.tracking:
        return None
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(cfg.storage_path)


def _is_server(uri: str) -> bool:
    return uri.split(":", 1)[0] in ("http", "https", "databricks")


def _artifact_location(uri: str, storage_root: str | None = None) -> str | None:
    """Where a new experiment keeps its artifacts: <storage>/mlruns, else beside an SQLite file;
    a server decides for itself. (MLflow's own default, ./mlruns, depends on the cwd.)"""
    if _is_server(uri):
        return None
    if storage_root:
        return storage.join(storage.normalize(storage_root), ARTIFACT_ROOT)
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///"):]).resolve().parent / ARTIFACT_ROOT)
    return None


def _client(uri: str):
    try:
        from mlflow import MlflowClient
    except ImportError as e:
        raise RegistryError(f"mlflow is not installed ({e}); pip install 'mlflow-skinny>=3.17' sqlalchemy alembic") from e
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _experiment_id(client, name: str, artifact_location: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # noqa: BLE001 - another process created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """The resolved config as MLflow params: nested keys joined with '.', values as strings."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:6000]  # MLflow's param value limit
    return out


def _metric_name(name: str) -> str:
    return re.sub(r"[^\w\-. /]", "_", name)


# ----------------------------------------------------------------------------- driver: start


def start(cfg, run_dir: str, info: dict[str, Any] | None = None) -> dict | None:
    """Create, or resume, the MLflow run of `run_dir` and log the resolved config as params.
    Returns the handle the workers log through ({"uri", "run_id"}), or None when tracking is off
    or the store failed (a warning: training goes on untracked)."""
    from cxrray.config import to_dict

    uri = tracking_uri_for(cfg)
    if uri is None:
        if cfg.tracking:
            log.info("experiment tracking is off: storage_path %s is a URI and MLflow's SQLite store cannot live "
                     "there; set tracking_uri=... (a server or an sqlite:/// file) to track this run", cfg.storage_path)
        return None
    try:
        client = _client(uri)
        exp_id = _experiment_id(client, cfg.experiment, _artifact_location(uri, cfg.storage_path))
        run = _find_run(client, exp_id, run_dir)
        params = {**flatten(to_dict(cfg)), **{f"data.{k}": str(v) for k, v in (info or {}).items()}}
        if run is None:
            run = client.create_run(exp_id, run_name=cfg.run_name,
                                    tags={RUN_DIR_TAG: run_dir, "cxrray.version": __version__})
            _log_params(client, run.info.run_id, params)
        else:
            log.info("MLflow: resuming run %s of %s", run.info.run_id, run_dir)
            client.update_run(run.info.run_id, status="RUNNING")
            _log_new_params(client, run, params)
        handle = {"uri": uri, "run_id": run.info.run_id, "experiment_id": exp_id, "experiment": cfg.experiment}
        storage.write_json(storage.join(run_dir, BREADCRUMB), handle)
        log.info("MLflow: run %s in experiment %r at %s", run.info.run_id, cfg.experiment, uri)
        return handle
    except Exception as e:  # noqa: BLE001 - tracking must never stop training
        log.warning("MLflow tracking disabled for this run: %s: %s", type(e).__name__, e)
        return None


def _find_run(client, exp_id: str, run_dir: str):
    if "'" in run_dir:  # MLflow's filter syntax has no escape for it: start a new run
        return None
    runs = client.search_runs([exp_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{run_dir}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[i:i + 100])


def _log_new_params(client, run, params: dict[str, str]) -> None:
    """A resumed run keeps its params (MLflow's are immutable); a changed value becomes a tag."""
    old = run.data.params
    _log_params(client, run.info.run_id, {k: v for k, v in params.items() if k not in old})
    for k, v in params.items():
        if k in old and old[k] != v:
            client.set_tag(run.info.run_id, f"resumed.{k}", v[:5000])


# ------------------------------------------------------------------------------- rank 0: epochs


def log_epoch(handle: dict | None, row: dict, *, best: float | None = None, roc: tuple | None = None) -> None:
    """Rank 0, after each epoch: the history row's numbers with step=epoch, per-class AUROC as
    `val_auroc.<class>`; `roc` = (space, targets, probs, metrics) of an improved epoch draws
    plots/roc_curves.png (so the run always holds the best epoch's ROC curves)."""
    if not handle or handle["run_id"] in _disabled:
        return
    try:
        from mlflow.entities import Metric

        step, now = int(row["epoch"]), _now_ms()
        values = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        values.pop("epoch", None)
        values.update({f"val_auroc.{_metric_name(k)}": v for k, v in (row.get("val_auroc") or {}).items()})
        if best is not None:
            values["best_val_mean_auroc"] = best  # as Ray Train reports it (-val_loss without AUROC)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items() if v is not None and v == v]
        client = _client(handle["uri"])
        client.log_batch(handle["run_id"], metrics=metrics)
        if roc is not None:
            _log_roc(client, handle["run_id"], step, *roc)
    except Exception as e:  # noqa: BLE001 - tracking must never stop training
        _disabled.add(handle["run_id"])
        log.warning("MLflow logging failed (epoch %s), not retried on this worker: %s: %s",
                    row.get("epoch"), type(e).__name__, e)


def _log_roc(client, run_id: str, epoch: int, space, targets, probs, metrics) -> None:
    from cxrray.report import plot_roc_curves

    with tempfile.TemporaryDirectory() as tmp:
        out = plot_roc_curves(space, targets, probs, metrics, Path(tmp) / "roc_curves.png",
                              title=f"Validation ROC, best epoch {epoch}")
        client.log_artifact(run_id, str(out), "plots")


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


# ------------------------------------------------------------------------------ driver: finish


def finish(handle: dict | None, run_dir: str, *, failed: bool = False) -> None:
    """After training: the best artifact (under `best/`), config.yaml and the training curves
    as MLflow artifacts, the best artifact's model_id as a tag, and the run's final status."""
    if not handle:
        return
    try:
        from cxrray.artifact import META, read_meta
        from cxrray.report import plot_training_curves

        client = _client(handle["uri"])
        run_id = handle["run_id"]
        best = storage.join(run_dir, "artifacts", "best")
        last = storage.join(run_dir, "artifacts", "last")
        with tempfile.TemporaryDirectory(prefix="cxrray-mlflow-") as tmp:
            if storage.exists(storage.join(best, META)):
                meta = read_meta(best)
                local = storage.download_dir(best, Path(tmp) / "best")
                client.log_artifacts(run_id, str(local), ARTIFACT_PATH)
                client.set_tag(run_id, "model_id", meta.model_id)
            if storage.exists(storage.join(last, META)):
                history = read_meta(last).summary.get("history", [])
                curves = plot_training_curves(history, Path(tmp) / "training_curves.png")
                if curves:
                    client.log_artifact(run_id, str(curves), "plots")
            if storage.exists(storage.join(run_dir, "config.yaml")):
                storage.copy_file(storage.join(run_dir, "config.yaml"), str(Path(tmp) / "config.yaml"))
                client.log_artifact(run_id, str(Path(tmp) / "config.yaml"))
        client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")
    except Exception as e:  # noqa: BLE001 - the model is trained and saved whatever MLflow says
        log.warning("MLflow: could not log the run's artifacts: %s: %s", type(e).__name__, e)


# -------------------------------------------------------------------------------- registration


def register(name: str, *, run_dir: str | None = None, artifact: str | None = None, alias: str | None = None,
             tracking_uri: str | None = None, experiment: str = "cxrray") -> dict[str, Any]:
    """Register a run's best artifact (`run_dir`, via its tracking.json) or any artifact dir
    (logged into a new run first) as a version of model `name`; `alias` then points at it.
    Registering the same model_id again reuses its version. Returns the URIs and ids."""
    from cxrray.artifact import read_meta

    if bool(run_dir) == bool(artifact):
        raise RegistryError("register needs exactly one of --run-dir or --artifact")
    if run_dir:
        crumb_path = storage.join(storage.normalize(run_dir), BREADCRUMB)
        if not storage.exists(crumb_path):
            raise RegistryError(f"{run_dir}: no {BREADCRUMB}, so no MLflow run was logged for it (trained with "
                                "tracking=false, or before tracking existed); register its artifact with --artifact")
        crumb = storage.read_json(crumb_path)
        uri = tracking_uri or crumb["uri"]
        client = _client(uri)
        run = client.get_run(crumb["run_id"])
        source = f"{run.info.artifact_uri.rstrip('/')}/{ARTIFACT_PATH}"
        model_id = run.data.tags.get("model_id") or read_meta(storage.join(run_dir, "artifacts", "best")).model_id
    else:
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise RegistryError("register --artifact needs --tracking-uri (or MLFLOW_TRACKING_URI), e.g. "
                                "sqlite:///runs/mlflow.db")
        client = _client(uri)
        meta = read_meta(artifact)
        model_id = meta.model_id
        run = _log_artifact_run(client, uri, experiment, artifact, meta)
        source = f"{run.info.artifact_uri.rstrip('/')}/{ARTIFACT_PATH}"
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, tags={"cxrray.version": __version__})
    existing = [v for v in client.search_model_versions(f"name='{name}'") if v.tags.get("model_id") == model_id]
    if existing:
        version = max(existing, key=lambda v: int(v.version))
        log.info("model_id %s is already version %s of %s", model_id, version.version, name)
    else:
        version = client.create_model_version(name, source, run_id=run.info.run_id,
                                              tags={"model_id": model_id, "cxrray.version": __version__},
                                              description=f"cxrray artifact {model_id}")
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    out = {"name": name, "version": int(version.version), "model_id": model_id, "run_id": run.info.run_id,
           "source": source, "tracking_uri": uri, "uri": f"models:/{name}/{version.version}"}
    if alias:
        out["alias_uri"] = f"models:/{name}@{alias}"
    return out


def _log_artifact_run(client, uri: str, experiment: str, artifact: str, meta):
    from cxrray.artifact import localize

    exp_id = _experiment_id(client, experiment, _artifact_location(uri))
    run = client.create_run(exp_id, run_name=f"register-{meta.model_id}",
                            tags={"model_id": meta.model_id, "cxrray.version": __version__,
                                  "cxrray.artifact": storage.normalize(artifact)})
    if meta.config:
        _log_params(client, run.info.run_id, flatten(meta.config))
    client.log_artifacts(run.info.run_id, str(localize(artifact)), ARTIFACT_PATH)
    client.set_terminated(run.info.run_id)
    return client.get_run(run.info.run_id)


# ---------------------------------------------------------------------------------- resolution


def model_uri(path: str | os.PathLike) -> str | None:
    """The `models:/...` URI in `path`, or None. Also recognises one that storage.normalize has
    already made into a local-looking path (`/cwd/models:/name@alias`), as ServeArgs does."""
    p = os.fspath(path)
    i = p.find("models:/")
    if i < 0 or (i > 0 and p[i - 1] != "/"):
        return None
    if i > 0 and os.path.exists(p):  # a real folder called "models:" (unlikely, but it is local)
        return None
    return p[i:]


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """'models:/n/3' -> ('n', '3', None); 'models:/n@prod' -> ('n', None, 'prod')."""
    m = _MODEL_URI.match(uri)
    if not m:
        raise RegistryError(f"{uri}: not a registry URI; write models:/NAME/VERSION or models:/NAME@ALIAS")
    return m["name"], m["version"], m["alias"]


def resolve_model_uri(uri: str, tracking_uri: str | None = None) -> str:
    """Where the artifact of `models:/name/3`, `models:/name/latest` or `models:/name@alias`
    lives: the version's source when cxrray can read it directly (a local path, s3://, gs://),
    else an MLflow download (mlflow-artifacts:/ from a server) cached once per model_id."""
    name, version, alias = parse_model_uri(uri)
    store = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not store:
        raise RegistryError(f"{uri}: set MLFLOW_TRACKING_URI to the registry's store (e.g. "
                            "sqlite:////abs/runs/mlflow.db; `cxrray register` prints it) to resolve registry URIs")
    from mlflow.exceptions import MlflowException

    client = _client(store)
    try:
        if alias:
            mv = client.get_model_version_by_alias(name, alias)
        elif version == "latest":
            mv = max(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
        else:
            mv = client.get_model_version(name, version)
    except (MlflowException, ValueError) as e:
        raise RegistryError(f"{uri}: not found in the registry at {store} ({str(e).splitlines()[0]})") from None
    source = mv.source
    log.info("%s -> version %s, model_id %s, %s", uri, mv.version, mv.tags.get("model_id", "?"), source)
    if source.startswith("file://") or "://" not in source or storage.scheme(source) in ("s3", "gs", "gcs", "hdfs"):
        return storage.normalize(source)
    return _download(mv, source, store)


def _download(mv, source: str, store: str) -> str:
    import mlflow.artifacts

    from cxrray.artifact import cache_root

    key = mv.tags.get("model_id") or hashlib.sha256(f"{store}|{mv.name}|{mv.version}".encode()).hexdigest()[:16]
    cached = cache_root() / key
    if (cached / "model.json").exists() and (cached / "model.pt").exists():
        return str(cached)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cached.parent))
    try:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp), tracking_uri=store))
        try:
            os.replace(got, cached)
        except OSError:
            pass  # another process won the race: its copy is identical
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(cached)
