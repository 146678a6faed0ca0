"""Programmatic entry points of Serve (the CLI's `cxrray serve`): deploy, find the URL, stop."""
import logging
import socket
import time
from typing import Any

from ray import serve

log = logging.getLogger("cxrray.serve")

_started_ray = False


class PortInUse(ValueError):
    """The asked port cannot be served on (a ValueError: the CLI prints it as one line)."""


def require_free_port(host: str, port: int) -> None:
    """Raise PortInUse when something already listens on host:port.

    Serve's proxy binds with SO_REUSEPORT, so a second `cxrray serve` on a port in use started
    without a word and took part of the first one's traffic: clients got answers from two
    configurations, possibly two models. A plain bind, without that option, fails as it should.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR, as the proxy itself binds: a port whose last server stopped a moment ago
        # still has connections in TIME_WAIT, and that is free to serve on; a listener is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise PortInUse(f"port {port} on {host} is in use ({e.strerror}): another cxrray serve or program "
                            "listens there; stop it or choose another --port") from None


def _joins_a_cluster() -> bool:
    """Whether ray.init() would join a running cluster rather than start one."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(None) is not None
    except Exception:  # noqa: BLE001 - Ray's internals moved: no check rather than a false refusal
        return True


def http_url(host: str | None = None) -> str:
    """The URL Serve's HTTP proxy listens on (the running instance's, not what was asked)."""
    from ray.serve.context import _get_global_client

    cfg = _get_global_client().http_config
    h = host or cfg.host
    return f"http://{'127.0.0.1' if h in ('0.0.0.0', '::') else h}:{cfg.port}"


def run_server(
    artifact: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    blocking: bool = True,
    name: str = "cxrray",
    route_prefix: str = "/",
    num_replicas: int | None = None,
    **limits: Any,
) -> str:
    """Deploy the app on Ray Serve and return its URL; with blocking=True, serve until Ctrl-C.

    limits: any ServeArgs field (max_upload_bytes, max_pixels, max_batch_size, ...).
    num_replicas: a fixed replica count instead of the default autoscaling (1..2).
    Starts a local Ray when none is running (or joins RAY_ADDRESS / a `ray start` cluster).
    """
    global _started_ray
    import ray

    from cxrray.serve import build_app  # the app module imports this one

    if not ray.is_initialized():
        # Our own Ray puts the proxy on this machine: its port must be free. A cluster joined
        # instead (RAY_ADDRESS, a `ray start` here) places the proxy itself, and may already serve
        # on the port (a redeploy).
        if not _joins_a_cluster():
            require_free_port(host, port)
        ray.init(include_dashboard=False, configure_logging=False)
        _started_ray = True
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": 60})
    args = {"artifact": artifact, **limits}
    deployment = dict(args.pop("deployment", {}) or {})
    if num_replicas is not None:
        deployment.update(num_replicas=num_replicas, autoscaling_config=None)
    else:
        deployment.setdefault("autoscaling_config", DEFAULT_AUTOSCALING)
    args["deployment"] = deployment
    serve.run(build_app(args), name=name, route_prefix=route_prefix)
    url = http_url() + ("" if route_prefix == "/" else route_prefix)
    log.info("cxrray serving %s at %s", artifact, url)
    if blocking:
        print(f"cxrray: serving {artifact} at {url} (Ctrl-C to stop)", flush=True)  # noqa: T201 - CLI
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            shutdown()
    return url


DEFAULT_AUTOSCALING = {
    "min_replicas": 1,
    "initial_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 8,
    "upscale_delay_s": 3,
    "downscale_delay_s": 30,
}


def shutdown() -> None:
    """Stop Serve (all apps, proxy, controller), and Ray if run_server started it."""
    global _started_ray
    import ray

    try:
        serve.shutdown()
    finally:
        if _started_ray and ray.is_initialized():
            ray.shutdown()
        _started_ray = False
