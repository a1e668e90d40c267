"""How much memory this process may still use: RAM (the cgroup limit and /proc/meminfo) and a GPU's."""

from __future__ import annotations

from pathlib import Path

import torch


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def cgroup_free_bytes(root: str = "/sys/fs/cgroup") -> int | None:
    """``memory.max - memory.current`` of this process's cgroup (v2), None without a limit."""
    limit, used = _read(f"{root}/memory.max"), _read(f"{root}/memory.current")
    if limit is None or limit == "max" or used is None:
        return None
    return max(0, int(limit) - int(used))


def meminfo_available_bytes(path: str = "/proc/meminfo") -> int | None:
    """MemAvailable of /proc/meminfo (the kernel's estimate of what can be allocated without swapping)."""
    text = _read(path)
    for line in (text or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def free_ram_bytes() -> int | None:
    """The smaller of the cgroup's headroom and MemAvailable; None where neither can be read."""
    known = [b for b in (cgroup_free_bytes(), meminfo_available_bytes()) if b is not None]
    return min(known) if known else None


def free_gpu_bytes(device: str | torch.device) -> int | None:
    """Free memory of a CUDA device (what torch's allocator has cached counts as free), None on CPU."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
