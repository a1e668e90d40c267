"""The one way fm_ray joins or starts Ray for a sweep, a packing job or a remote driver."""

from __future__ import annotations

import logging
import os


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
    # Workers on a cluster do not share this shell's environment: forward FM_RAY_* (data root, cache).
    # Inside `ray job submit` the job's own runtime env governs, and Ray refuses a second one.
    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    env = {} if in_job else {k: v for k, v in os.environ.items() if k.startswith("FM_RAY_")}
    runtime_env = {"env_vars": env} if env else None
    ray.init(address=address, runtime_env=runtime_env, log_to_driver=log_to_driver, logging_level=ray_log_level())
    return True
