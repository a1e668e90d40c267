"""What checking a packed pool end to end costs: the source listing at pack time, the footers at open
time and each part file's sha256 at first read, side by side with the work they guard.

    python -m benchmarks.pool_integrity [--images 2000] [--rows-per-file 8192]

Packs FashionMNIST (the built-in, 70,000 rows) and a folder of `--images` PNGs (FashionMNIST train
images written as RGB files) into temporary folders, then prints one JSON line per pool:

  listing_s          building the source listing alone (sha256 of every image file, or of its raw pixels)
  pack_s             the whole pack: opening the source (loading or listing it), decoding, writing
  open_s             open_pool: the manifest checked against the folders and every file's footer
  columns_cold_s     ids and labels of every split, each file's sha256 checked (first read in a process)
  columns_warm_s     the same with the files already checked (every later read in that process)
  listing_ratio      listing_s / pack_s
  verify_ratio       columns_cold_s / columns_warm_s
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure(source: str, out: str, rows_per_file: int) -> dict[str, Any]:
    import fm_ray.data.parquet as parquet
    from fm_ray.data.pack import pack_input, pack_source

    with contextlib.redirect_stdout(sys.stderr):
        src, open_source_s = _timed(lambda: pack_input(source, None, False, 3, None))  # builds the listing
        _, pack_s = _timed(lambda: pack_source(src, out, rows_per_file))
    listing_s = _listing_alone(source)
    parquet._VERIFIED.clear()
    pool, open_s = _timed(lambda: parquet.open_pool(out))
    _, cold = _timed(lambda: [parquet.open_pool(out).columns(s) for s in pool.splits])
    _, warm = _timed(lambda: [parquet.open_pool(out).columns(s) for s in pool.splits])
    return {
        "bench": "pool_integrity",
        "source": source.split(":")[0],
        "rows": sum(f.rows for f in pool.splits.values()),
        "listing_s": round(listing_s, 3),
        "pack_s": round(open_source_s + pack_s, 3),
        "open_s": round(open_s, 4),
        "columns_cold_s": round(cold, 4),
        "columns_warm_s": round(warm, 4),
        "listing_ratio": round(listing_s / (open_source_s + pack_s), 3),
        "verify_ratio": round(cold / warm, 2),
    }


def _listing_alone(source: str) -> float:
    """The listing's own time, apart from loading or decoding: what this check adds to a pack."""
    from fm_ray.data.fingerprint import array_listing, file_listing
    from fm_ray.data.registry import open_source

    if source == "fashion_mnist":
        d = open_source(source)
        splits = [(d.train_x, d.train_y), (d.test_x, d.test_y)]
        _, s = _timed(
            lambda: [array_listing([str(i) for i in range(len(x))], y.tolist(), x.numpy()) for x, y in splits]
        )
        return s
    root = Path(source.split(":", 1)[1])
    items = [(str(p), p.relative_to(root).as_posix(), 0) for p in sorted(root.rglob("*.png"))]
    _, s = _timed(lambda: file_listing(items))
    return s


def _write_folder(root: Path, n: int) -> None:
    from PIL import Image

    from fm_ray.data.registry import open_source

    fm = open_source("fashion_mnist")
    for i in range(n):
        folder = root / "train" / str(int(fm.train_y[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(fm.train_x[i, 0].numpy()).convert("RGB").save(folder / f"{i:06d}.png")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2000, help="PNG files in the folder source")
    ap.add_argument("--rows-per-file", type=int, default=8192)
    a = ap.parse_args(argv)
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            _write_folder(Path(tmp) / "src", a.images)
            for source, name in (("fashion_mnist", "fm"), (f"imagefolder:{tmp}/src", "folder")):
                row = measure(source, f"{tmp}/{name}", a.rows_per_file)
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        ray.shutdown()
    return rows


if __name__ == "__main__":
    main()
