"""The one way fm_ray joins or starts Ray for a sweep, a packing job or a remote driver."""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

from fm_ray._internal.boundary import keep_sigterm
from fm_ray._internal.procenv import compute_env
from fm_ray.errors import UserError

CONNECT_WAIT_S = float(os.environ.get("FM_RAY_CONNECT_WAIT_S", "30"))  # Ray itself retries forever


def _host_port(address: str | None) -> tuple[str, int] | None:
    """(host, port) of a cluster address to join; None for a local instance or `auto`."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address in ("auto", "local"):
        return None
    hostport = address.split("://", 1)[-1].split("/", 1)[0]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(f"--ray-address {address!r}: give host:port (e.g. 10.0.0.1:6379) or ray://host:10001")
    return host.strip("[]"), int(port)


def reachable_or_die(address: str | None, wait_s: float = CONNECT_WAIT_S) -> None:
    """Wait up to `wait_s` for the cluster address to accept a TCP connection and answer the gRPC
    (HTTP/2) handshake that Ray's GCS and Ray Client servers speak, else one UserError.

    Ray's `ray.init(address=...)` retries a dead address forever, and waits minutes on a port where
    some other server listens; this touches only that host:port, within one deadline for both steps."""
    target = _host_port(address)
    if target is None:
        return
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with socket.create_connection(target, timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                break
        except OSError as e:
            if time.monotonic() >= deadline:
                reason = e.strerror or type(e).__name__
                raise UserError(
                    f"cannot reach the Ray cluster at {target[0]}:{target[1]} within {wait_s:.0f}s ({reason}): "
                    "check --ray-address (the head's GCS port, 6379 by default; ray://host:10001 for Ray Client) "
                    "and that the head is up"
                ) from None
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    if not _speaks_grpc(target, max(0.5, deadline - time.monotonic())):
        raise UserError(
            f"{target[0]}:{target[1]} accepts connections but does not answer as a Ray head within {wait_s:.0f}s "
            "(no gRPC handshake): another server listens there; check --ray-address (the head's GCS port, "
            "6379 by default; ray://host:10001 for Ray Client)"
        )


def _speaks_grpc(target: tuple[str, int], wait_s: float) -> bool:
    """Whether `target` completes an HTTP/2 connection (gRPC's) within `wait_s` seconds.

    With RAY_USE_TLS the handshake needs Ray's certificates: trusted as it is then."""
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return True
    import grpc

    host = f"[{target[0]}]" if ":" in target[0] else target[0]
    channel = grpc.insecure_channel(f"{host}:{target[1]}")
    try:
        grpc.channel_ready_future(channel).result(timeout=wait_s)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()


def init_kwargs(address: str | None) -> dict[str, str]:
    """A cluster on this machine's loopback is joined as 127.0.0.1 (Ray would otherwise take the
    interface address it routes to the internet by)."""
    target = _host_port(address)
    if target is not None and target[0] in ("127.0.0.1", "localhost"):
        return {"_node_ip_address": "127.0.0.1"}
    return {}


def ray_log_level() -> int:
    """Ray's own logger level for ray.init: warnings and errors only, unless fm_ray is at DEBUG."""
    return logging.DEBUG if logging.getLogger("fm_ray").isEnabledFor(logging.DEBUG) else logging.WARNING


def ensure_ray(address: str | None, log_to_driver: bool = True) -> bool:
    """Join `address` (auto | ray://...) or start local Ray; True if this call started it.

    `log_to_driver=False` keeps the workers' own output off this console (a sweep's trials report
    through Tune instead). Ray's INFO lines (a started instance, the dashboard) stay off too."""
    import ray

    if ray.is_initialized():
        return False
    reachable_or_die(address)
    # Workers on a cluster do not share this shell's environment: forward FM_RAY_* (data root, cache),
    # and start every worker (Tune trials, their shards) with the compute environment (procenv).
    # Inside `ray job submit` the job's own runtime env governs, and Ray refuses a second one.
    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    env = {} if in_job else {k: v for k, v in os.environ.items() if k.startswith("FM_RAY_")} | compute_env()
    runtime_env = {"env_vars": env} if env else None
    init_ray(
        address=address,
        runtime_env=runtime_env,
        log_to_driver=log_to_driver,
        logging_level=ray_log_level(),
        **init_kwargs(address),
    )
    return True


def init_ray(**kwargs: Any) -> None:
    """`ray.init(**kwargs)`, keeping the error boundary's SIGTERM handler (Ray would install `sys.exit`)."""
    import ray

    with keep_sigterm():
        ray.init(**kwargs)
