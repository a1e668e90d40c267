"""Progress lines, one format for the loop and the strategies' phases."""

import time


def log(msg: str) -> None:
    print(f"[fm-ray {time.strftime('%H:%M:%S')}] {msg}", flush=True)
