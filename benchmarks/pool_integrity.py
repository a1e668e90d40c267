"""What checking a packed pool end to end costs: the source listing at pack time, the footers at open
time, the ids' and labels' digests the driver checks, and every row group's digest checked as it
is read, side by side with the work they guard.

    python -m benchmarks.pool_integrity [--images 2000] [--rows-per-file 8192]

Packs FashionMNIST (the built-in, 70,000 rows) and a folder of `--images` PNGs (FashionMNIST train
images written as RGB files) into temporary folders, then prints one JSON line per pool:

  listing_s          building the source listing alone (sha256 of every image file, or of its raw pixels)
  pack_s             the whole pack: opening the source (loading or listing it), decoding, writing
  open_s             open_pool: the manifest checked against the folders and every file's footer
  columns_s          ids and labels of every split, each file's digests of them checked
  images_checked_s   every train image read row group by row group as a shard's pass reads it, each
                     row group checked against its digest
  images_raw_s       the same row groups read and decoded with pyarrow alone, nothing checked
  listing_ratio      listing_s / pack_s
  verify_ratio       images_checked_s / images_raw_s: what checking every read costs
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
    pool, open_s = _timed(lambda: parquet.open_pool(out))
    _, columns_s = _timed(lambda: [parquet.open_pool(out).columns(s) for s in pool.splits])
    _, checked = _timed(lambda: _read_every_block(pool.images("train")))
    _, raw = _timed(lambda: _read_raw(out, pool.splits["train"], pool.shape))
    return {
        "bench": "pool_integrity",
        "source": source.split(":")[0],
        "rows": sum(f.rows for f in pool.splits.values()),
        "listing_s": round(listing_s, 3),
        "pack_s": round(open_source_s + pack_s, 3),
        "open_s": round(open_s, 4),
        "columns_s": round(columns_s, 4),
        "images_checked_s": round(checked, 4),
        "images_raw_s": round(raw, 4),
        "listing_ratio": round(listing_s / (open_source_s + pack_s), 3),
        "verify_ratio": round(checked / raw, 2),
    }


def _read_every_block(images: Any) -> None:
    """A shard's pass: every row, block by block (fm_ray.pool.shard.BLOCK)."""
    import numpy as np

    from fm_ray.pool.shard import BLOCK

    for a in range(0, len(images), BLOCK):
        images.read(np.arange(a, min(a + BLOCK, len(images))))
    images.close()


def _read_raw(out: str, files: Any, shape: tuple[int, int, int]) -> None:
    import pyarrow.parquet as pq

    from fm_ray.data.parquet import raw_images

    for name in files.files:
        f = pq.ParquetFile(f"{out}/{name}")
        for g in range(f.metadata.num_row_groups):
            raw_images(f.read_row_group(g, columns=["image"]).column(0).combine_chunks(), shape)


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
