"""The environment fm_ray starts its compute processes with: Ray shard actors and Tune trials (the
job's runtime env), and the `fm-ray` command's run process (where `--backend local` shards run).

torch reads ``THP_MEM_ALLOC_ENABLE`` once, at its first allocation, so it has to be in a process's
environment when the process starts. It makes torch's CPU allocator align tensors of 2 MB and more
to 2 MB and ask the kernel for transparent huge pages for them (madvise). A shard's pool-sized
tensors (Fisher embeddings, the greedy state, the cached predictions) are read whole at every greedy
step; with 4 KB pages the TLB misses grew with them: a step cost 8.5 us a candidate on a shard of
500,000 against 6.1 on 125,000, 5.7 at both with huge pages (benchmarks/million.py: exact
FisherMask's round grew 4.8x from 250,000 to 1M). A value the user set is kept.
"""

from __future__ import annotations

import os

COMPUTE_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}


def compute_env() -> dict[str, str]:
    """``COMPUTE_ENV`` with this process's own values where it sets them (the user's choice stands)."""
    return {k: os.environ.get(k, v) for k, v in COMPUTE_ENV.items()}
