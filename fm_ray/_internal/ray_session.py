"""The one way fm_ray joins or starts Ray for a sweep, a packing job or a remote driver."""

from __future__ import annotations

import os


def ensure_ray(address: str | None) -> bool:
    """Join `address` (auto | ray://...) or start local Ray; True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    # Workers on a cluster do not share this shell's environment: forward FM_RAY_* (data root, cache).
    # Inside `ray job submit` the job's own runtime env governs, and Ray refuses a second one.
    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    env = {} if in_job else {k: v for k, v in os.environ.items() if k.startswith("FM_RAY_")}
    ray.init(address=address, runtime_env={"env_vars": env} if env else None, log_to_driver=True)
    return True
