"""What cxrray prints: its own lines by default, Ray's chatter only with `-v`.

A cxrray run drives several Ray components whose INFO lines (and the lines their workers and
actors print, relayed to the driver) used to bury cxrray's progress: Train V2's per-report
`TrainingReport(...)` dumps, the controller's worker-group lines, Ray Data's "Starting
execution" / "Execution plan" pair per dataset and epoch. Quiet mode (the default) hides them
in three places, each for the one kind of line it can see:

- the driver's Python loggers (`setup_console`): cxrray at INFO, Ray's at WARNING;
- Ray Train's workers and controller: RunConfig's `logging_config` (`train_logging_config`)
  for its "ray.train" loggers, and the train loop's `setup_worker_logging` for the root logger
  (Train logs each report there) and Ray Data, keeping cxrray's own logger at INFO, so rank 0's
  epoch and step-progress lines stay;
- the driver's relay of worker output (`install_relay_filter`): lines from Ray's own actors (the Train
  controller, the Data split coordinator, ...) are dropped unless they report an error.

Nothing is lost: every line is still in Ray's log directory (named in the summaries, see
`ray_log_dir`), and a failed worker's traceback reaches the driver as the raised exception.
Progress of long work (`Progress`) is a tqdm bar on a terminal and a log line every
`CXRRAY_PROGRESS_EVERY_S` seconds (default 30) elsewhere: in Ray workers, job logs, files.
"""
from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

log = logging.getLogger("cxrray")

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
RAY_LOGGERS = ("ray", "ray.train", "ray.tune", "ray.serve")  # ray.data: see quiet_ray_data
# Actors Ray itself starts for Train, Data and Serve. Their output is relayed only when it
# reports an error; cxrray's code runs in RayTrainWorker, Data tasks/actors and Serve replicas,
# whose output is always relayed.
RAY_INTERNAL_ACTORS = frozenset({
    "TrainController", "PlacementGroupCleaner", "PreemptionWatcher", "SplitCoordinator", "DatasetManager",
    "_StatsActor", "StatsActor", "AutoscalingRequester", "DefaultAutoscaler", "ServeController",
    "ProxyActor", "TrainStateActor", "SynchronizationActor", "_QueueActor",
})
SERVE_INFO_LINE = re.compile(r"(INFO|DEBUG) \d{4}-\d\d-\d\d ")  # Serve's format: level first
ERROR_LINE = re.compile(r"Traceback|Error|Exception|\bERROR\b|\bCRITICAL\b")
# Other libraries' INFO chatter (MLflow's database set-up on every first run of a store).
THIRD_PARTY_CHATTER = ("mlflow.store.db.utils",)
# Ray's own notes pushed to the driver as "(raylet)" lines that need no action from a cxrray
# user: a retried task of an actor killed on purpose (Serve's shutdown), the worker pool's
# start-up concurrency note (2 cores, Data's actor pool). Any other raylet line (a worker
# killed for memory, an actor that died) still prints.
EXPECTED_RAYLET_LINE = re.compile(r"killed by `ray\.kill`|PYTHON worker processes have been started on node")
# Ray Data warns once per process that its progress bars are off: cxrray turned them off.
_DATA_NOISE = re.compile(r"^Progress bars (for operators )?disabled")

API_SERVER_VAR = "RAY_API_SERVER_ADDRESS"  # Ray's name (ray_constants)
_state: dict[str, Any] = {"verbose": False, "ray_log_dir": None, "relay_patched": False}


def verbose() -> bool:
    return bool(_state["verbose"])


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at emit time (pytest's capsys swaps it per test)."""

    _cxrray = True

    def __init__(self):
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter(FORMAT))

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _is_rays(handler: logging.Handler) -> bool:
    """The handler ray.init adds to the driver's root logger when given a LoggingConfig (or
    RAY_LOGGING_CONFIG_ENCODING is set): cxrray's handler prints those lines already."""
    return any(type(f).__name__ == "CoreContextFilter" for f in handler.filters)


def setup_console(verbose: bool = False, *, uses_ray: bool = False) -> None:
    """The driver's logging: one stderr handler on the root logger (unless one is there, as
    logging.basicConfig would); cxrray at INFO (DEBUG with verbose); everything else, Ray's
    loggers included, at WARNING unless verbose. `uses_ray`: import Ray now (its import resets
    the "ray" logger to INFO) and filter what its workers print. Safe to call again."""
    _state["verbose"] = verbose
    root = logging.getLogger()
    for h in [h for h in root.handlers if _is_rays(h)]:
        root.removeHandler(h)
    if not root.handlers:
        root.addHandler(_StderrHandler())
    # Other libraries' INFO lines (an image codec's per-tile notes, ...) only with -v.
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("cxrray").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        # Ray's own UserWarnings/DeprecationWarnings (about its internals: actor pool sizes,
        # deprecated options it passes itself) are chatter too.
        warnings.filterwarnings("ignore", module=r"ray(\.|$)")
    if uses_ray:
        # Importing Ray configures the "ray" and "ray.data" loggers (INFO): adjusted below.
        import ray.data  # noqa: F401

        install_relay_filter()
    ray_level = logging.INFO if verbose else logging.WARNING
    for name in RAY_LOGGERS:
        logging.getLogger(name).setLevel(ray_level)
    for name in THIRD_PARTY_CHATTER:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    # Serve (re)configures "ray.serve" whenever it starts (level INFO, its own handler), but
    # leaves the logger's filters alone.
    serve_logger = logging.getLogger("ray.serve")
    for f in [f for f in serve_logger.filters if isinstance(f, _WarningsOnly)]:
        serve_logger.removeFilter(f)
    if not verbose:
        serve_logger.addFilter(_WarningsOnly())
    ray_logger = logging.getLogger("ray")
    if any(not getattr(h, "_cxrray", False) for h in ray_logger.handlers):
        ray_logger.handlers.clear()  # Ray's own handler: its lines go through cxrray's instead
        ray_logger.propagate = True
    if "ray.data" in sys.modules:
        quiet_ray_data(verbose)


def quiet_ray_data(verbose: bool | None = None) -> None:
    """Ray Data logs to its own handlers (console and ray-data.log, not propagated): its console
    handler goes to WARNING (the file keeps everything), and it stops announcing each execution."""
    import ray.data

    verbose = _state["verbose"] if verbose is None else verbose
    logger = logging.getLogger("ray.data")
    logger.setLevel(logging.DEBUG)  # as Ray configures it: ray-data.log keeps every line
    for h in logger.handlers:
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            h.setLevel(logging.INFO if verbose else logging.WARNING)
            if not verbose and not any(isinstance(f, _DropDataNoise) for f in h.filters):
                h.addFilter(_DropDataNoise())
    ctx = ray.data.DataContext.get_current()
    ctx.print_on_execution_start = verbose  # copied into every dataset, so into Train's workers too


class _WarningsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


class _DropDataNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _DATA_NOISE.match(str(record.getMessage()))


def train_logging_config():
    """RunConfig(logging_config=...): Ray Train's own loggers ("ray.train.*", on the controller
    and every train worker) print WARNING and above unless verbose; its files keep everything."""
    import ray.train

    return ray.train.LoggingConfig(log_level="INFO" if _state["verbose"] else "WARNING")


@contextmanager
def local_dashboard() -> Iterator[dict[str, Any]]:
    """ray.init options for a local cluster with a dashboard that Ray's own actors can find.

    The dashboard serves the State API, which Train V2's PlacementGroupCleaner polls every
    second for the controller's state: without one, each poll logged "Failed to query Ray
    Train Controller actor state" (124 lines in one demo). The actor finds the API server
    through RAY_API_SERVER_ADDRESS if set, else by looking for a Ray instance on the host,
    which fails when a second cluster runs there (a test session's, a colleague's); so the
    dashboard gets a free port and the variable names it while ray.init spawns the node's
    processes (whose environment every worker inherits)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    saved = os.environ.get(API_SERVER_VAR)
    os.environ[API_SERVER_VAR] = f"http://127.0.0.1:{port}"
    try:
        yield {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port}
    finally:
        if saved is None:
            os.environ.pop(API_SERVER_VAR, None)
        else:
            os.environ[API_SERVER_VAR] = saved


def after_ray_init() -> None:
    """Call right after ray.init(configure_logging=False): route the "ray" logger (which ray.init
    leaves without a handler) through cxrray's, remember the log directory, filter the relay
    of worker output."""
    setup_console(_state["verbose"])
    quiet_ray_data()
    _state["ray_log_dir"] = _find_ray_log_dir()
    install_relay_filter()


def _find_ray_log_dir() -> str | None:
    try:
        import ray._private.worker as ray_worker

        node = ray_worker._global_node
        return node.get_logs_dir_path() if node is not None else None
    except Exception:  # noqa: BLE001 - only for the summary
        return None


def ray_log_dir() -> str | None:
    """Ray's log directory of the session this process started or joined (None without Ray)."""
    if _state["ray_log_dir"] is None:
        _state["ray_log_dir"] = _find_ray_log_dir()
    return _state["ray_log_dir"]


def keep_relayed_line(source: str | None, line: str) -> bool:
    """Quiet mode's rule for one relayed line: Ray's own actors only get through with errors;
    Serve replicas (cxrray's code) without Serve's INFO lines (one access-log line a request)."""
    if source == "raylet":
        return not EXPECTED_RAYLET_LINE.search(line)
    if source in RAY_INTERNAL_ACTORS or source == "autoscaler":
        return bool(ERROR_LINE.search(line))
    if str(source).startswith("ServeReplica:"):
        return not SERVE_INFO_LINE.match(line)
    return True


def _keep(data: dict) -> dict | None:
    """`data` (one relayed batch) with only the lines quiet mode keeps; None if none are left."""
    if _state["verbose"]:
        return data
    source = data.get("actor_name") or data.get("pid")
    lines = [ln for ln in data.get("lines", []) if keep_relayed_line(source, ln)]
    return {**data, "lines": lines} if lines else None


def install_relay_filter() -> None:
    """Filter worker output on its way to the driver's terminal (once per process). Ray has no
    public hook for this, so this wraps two of Ray's (2.60) internals: the dispatcher of worker
    output and the printer of the "(raylet)" messages; where they are missing nothing is filtered."""
    if _state["relay_patched"]:
        return
    _state["relay_patched"] = True
    try:
        import ray._private.worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    emit, print_to_stdstream = dispatcher.emit, getattr(ray_worker, "print_to_stdstream", None)

    def filtered_emit(data: dict) -> None:
        kept = _keep(data)
        if kept is not None:
            emit(kept)

    def filtered_print(data: dict, *args, **kwargs) -> None:
        kept = _keep(data) if data.get("pid") == "raylet" else data
        if kept is not None:
            print_to_stdstream(kept, *args, **kwargs)

    dispatcher.emit = filtered_emit
    if print_to_stdstream is not None:
        ray_worker.print_to_stdstream = filtered_print


def setup_worker_logging(verbose: bool = False) -> None:
    """In a Ray Train worker, first thing in the train loop (Ray Train has configured the
    worker's loggers by then): cxrray's logger at INFO with its own handler; the root logger,
    where Train logs each `TrainingReport(...)` at INFO, at WARNING unless verbose; Ray Data
    quiet unless verbose."""
    _state["verbose"] = verbose
    logger = logging.getLogger("cxrray")
    if not any(getattr(h, "_cxrray", False) for h in logger.handlers):
        logger.addHandler(_StderrHandler())
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    if not verbose:
        logging.getLogger().setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", module=r"ray(\.|$)")
    quiet_ray_data(verbose)


# --- progress of long work ----------------------------------------------------------------------


def progress_every_s() -> float:
    return float(os.environ.get("CXRRAY_PROGRESS_EVERY_S", "30"))


def hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


class Progress:
    """tqdm on a terminal; otherwise a log line every `every_s` seconds (and one at the end)
    with done/total, throughput and ETA. `total` may be None (unknown: no ETA).

    `count` is what the bar counts (steps, batches); `rate_unit` what the rate counts (images):
    update(n, images=k) advances the bar by n and the rate by k."""

    def __init__(self, what: str, total: int | None, *, unit: str = "it", rate_unit: str | None = None,
                 every_s: float | None = None, logger: logging.Logger | None = None, enabled: bool = True,
                 tty: bool | None = None):
        self.what, self.total, self.unit, self.rate_unit = what, total, unit, rate_unit or unit
        self.every_s = progress_every_s() if every_s is None else every_s
        self.logger = logger or log
        self.enabled = enabled
        self.n = self.amount = 0
        self.t0 = self.last = time.perf_counter()
        self.postfix = ""
        self.bar = None
        if enabled and (sys.stderr.isatty() if tty is None else tty):
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=unit, desc=what, file=sys.stderr, smoothing=0.1, leave=False,
                            dynamic_ncols=True)

    def update(self, n: int = 1, *, amount: int | None = None, **postfix: float) -> None:
        self.n += n
        self.amount += n if amount is None else amount
        if postfix:
            self.postfix = "  " + "  ".join(f"{k} {v:.4g}" for k, v in postfix.items())
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            return
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            self.logger.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.perf_counter()) - self.t0, 1e-9)
        rate = self.amount / elapsed
        if self.total:
            left = (self.total - self.n) * (elapsed / self.n) if self.n else float("inf")
            done = f"{self.n}/{self.total} {self.unit} ({self.n / self.total:.0%})"
            eta = f", ETA {hms(max(left, 0.0))}"
        else:
            done, eta = f"{self.n} {self.unit}", ""
        return f"{self.what}: {done}, {rate:.1f} {self.rate_unit}/s{eta}{self.postfix}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
