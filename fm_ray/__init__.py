"""fm_ray: scale-out FisherMask active learning on Ray. `fm_ray.select(model, pool, k)` from Python."""

from typing import Any

__version__ = "0.1.0"
__all__ = ["select", "Selection", "PoolSession", "UserError", "DegenerateModelError", "InternalError"]


def __getattr__(name: str) -> Any:  # lazy: `import fm_ray` (and the CLI) stay light until select is used
    if name in __all__:
        import importlib

        return getattr(importlib.import_module("fm_ray.api"), name)
    raise AttributeError(f"module 'fm_ray' has no attribute {name!r}")
