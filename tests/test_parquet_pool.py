"""`--dataset parquet:<pool>`: a packed FashionMNIST gives bit-identical inputs and the same picks as the
in-RAM dataset for 1, 2 (Ray) and 3 shards, streamed or held; the driver reads labels and the test
split, never the pool's pixels; bad or changed pools fail with one line, at opening or at the read."""

import dataclasses
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray
import torch

from fm_ray.cli import main
from fm_ray.config import DataConfig, PoolConfig, RunConfig, StrategyConfig, TrainConfig
from fm_ray.data.pack import pack
from fm_ray.data.parquet import (
    FILE_META,
    READ_BYTES,
    ROW_GROUP,
    ParquetImages,
    ids_digest,
    image_digest,
    labels_digest,
    open_pool,
    raw_images,
)
from fm_ray.data.registry import open_source
from fm_ray.data.settings import sample_pool
from fm_ray.errors import UserError
from fm_ray.pool.local import LocalPool
from fm_ray.pool.ray_pool import RayPool
from fm_ray.pool.shard import nonfinite_outputs, set_round
from fm_ray.run.recipe import run_experiment
from fm_ray.run.rundir import TIMING_COLUMNS
from fm_ray.strategies import STRATEGIES

pytestmark = pytest.mark.ray
CHECKED = ["fishermask", "entropy"]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """FashionMNIST packed once, in files of 20,000 rows (so the pool spans several files)."""
    out = tmp_path_factory.mktemp("pools") / "fmnist"
    pack("fashion_mnist", str(out), rows_per_file=20_000)
    return out


def test_packed_builtin_gives_bit_identical_inputs(fmnist, packed):
    data = open_source(DataConfig(dataset=f"parquet:{packed}"))
    assert (data.mean, data.std, data.augment) == (fmnist.mean, fmnist.std, fmnist.augment)
    assert torch.equal(data.train_y, fmnist.train_y) and torch.equal(data.test_y, fmnist.test_y)
    rows = np.array([59_999, 0, 19_999, 20_000, 1023, 1024, 41_234])  # across row groups and files
    assert torch.equal(data.train.images.read(rows), fmnist.train_x[rows])
    assert torch.equal(data.test.images.read(np.arange(10_000)), fmnist.test_x)
    cfg = DataConfig(dataset="fashion_mnist", setting="setting2")
    a, b = sample_pool(cfg, fmnist, 3), sample_pool(cfg, data, 3)
    assert np.array_equal(a.train_index, b.train_index) and np.array_equal(a.test_index, b.test_index)


def test_uri_reads_like_a_path(packed):
    by_uri = open_source(DataConfig(dataset=f"parquet:file://{packed}"))
    by_path = open_source(DataConfig(dataset=f"parquet:{packed}"))
    rows = np.array([5, 33_000])
    assert torch.equal(by_uri.train.images.read(rows), by_path.train.images.read(rows))


def select_all(pool, trained) -> dict[str, list[int]]:
    out = {}
    for name in CHECKED:
        pool.map(set_round, trained["weights"], trained["labeled"])
        out[name] = STRATEGIES[name].select(pool, trained["context"](name, fisher_samples=128)).indices
    return out


@pytest.fixture(scope="module")
def in_ram_picks(trained):
    return select_all(LocalPool(trained["spec"], trained["x_pool"], 1), trained)


def parquet_pool_images(packed):
    """The conftest pool (the first 560 train images), as rows of the packed pool."""
    return open_pool(str(packed)).images("train").subset(np.arange(560))


@pytest.mark.parametrize("shards", [1, 3])
def test_local_shards_on_parquet_pick_like_in_ram(trained, packed, in_ram_picks, shards):
    pool = LocalPool(trained["spec"], parquet_pool_images(packed), shards)
    assert pool.n_shards == shards
    assert select_all(pool, trained) == in_ram_picks


def test_ray_shards_read_only_their_own_rows_and_pick_like_in_ram(trained, packed, in_ram_picks, monkeypatch):
    driver_reads = []
    original = ParquetImages.read
    monkeypatch.setattr(ParquetImages, "read", lambda self, pos: driver_reads.append(pos) or original(self, pos))
    images = parquet_pool_images(packed)
    pool = RayPool(PoolConfig(backend="ray", shards=2), trained["spec"], images)
    try:
        # each actor got a descriptor of its own rows (not pixels) and read them itself
        shipped = [pool._source.subset(part) for part in pool._parts]  # what build() sends each actor
        assert [len(s) for s in shipped] == [256, 304]  # 560 rows = 3 blocks of 256: cut after one
        assert np.array_equal(np.concatenate([s.rows for s in shipped]), np.arange(560))
        assert all(isinstance(s, ParquetImages) for s in shipped)
        assert select_all(pool, trained) == in_ram_picks
    finally:
        pool.close()
    assert driver_reads == []  # the driver process never read a pixel of the pool


def small_cfg(dataset: str, backend: str = "ray", shards: int = 2) -> RunConfig:
    return RunConfig(
        data=DataConfig(dataset=dataset, setting="custom", class_counts=((0, 60), (1, 300), (2, 60))),
        train=TrainConfig(epochs=1, device="cpu"),
        strategy=StrategyConfig(name="fishermask", fisher_samples=128),
        pool=PoolConfig(backend=backend, shards=shards),
        init=20,
        batch=10,
        rounds=2,
        seed=4,
    )


def test_run_on_parquet_equals_run_on_fashion_mnist_and_driver_reads_no_pool_pixels(packed, tmp_path, monkeypatch):
    reads: list[tuple[str, np.ndarray]] = []
    original = ParquetImages.read
    monkeypatch.setattr(
        ParquetImages, "read", lambda self, pos: reads.append((self.split, self.rows[pos])) or original(self, pos)
    )
    READ_BYTES.clear()
    run_experiment(small_cfg(f"parquet:{packed}"), tmp_path / "pq")
    driver_bytes = dict(READ_BYTES)
    monkeypatch.setattr(ParquetImages, "read", original)
    run_experiment(small_cfg("fashion_mnist", backend="local", shards=1), tmp_path / "fm")

    def rows(d, name):
        skip = {*TIMING_COLUMNS, "backend", "shards", "run_id", "dataset"}
        return [{k: v for k, v in r.items() if k not in skip} for r in pq.read_table(tmp_path / d / name).to_pylist()]

    assert rows("pq", "queries.parquet") == rows("fm", "queries.parquet")
    assert rows("pq", "rounds.parquet") == rows("fm", "rounds.parquet")
    # what the driver read: the test split once, and no train row (the shards send it the labeled ones)
    data = open_source(DataConfig(dataset=f"parquet:{packed}"))
    pool = sample_pool(small_cfg("fashion_mnist").data, data, 4)
    assert [r.tolist() for s, r in reads] == [pool.test_index.tolist()]
    # and the bytes: the image column chunks of exactly the test row groups that hold those rows
    assert driver_bytes["image"] == group_bytes(packed, "test", pool.test_index)


def group_bytes(packed, split: str, rows: np.ndarray) -> int:
    """Compressed bytes of the image column chunks of the row groups that hold `rows` of a split."""
    sizes = []
    for f in sorted((packed / split).glob("part-*.parquet")):
        meta = pq.ParquetFile(f).metadata
        sizes += [
            (meta.row_group(g).num_rows, meta.row_group(g).column(1).total_compressed_size)
            for g in range(meta.num_row_groups)
        ]
    starts = np.cumsum([0] + [n for n, _ in sizes])
    groups = np.unique(np.searchsorted(starts, rows, side="right") - 1)
    return sum(sizes[g][1] for g in groups)


def rewrite(path, fn):
    """Write a part file again through `fn`, its footer and row groups as the packer wrote them."""
    table = pq.read_table(path)
    pq.write_table(fn(table).replace_schema_metadata(table.schema.metadata), path, row_group_size=ROW_GROUP)


def edit_manifest(pool, fn) -> None:
    m = json.loads((pool / "pool.json").read_text())
    fn(m)
    (pool / "pool.json").write_text(json.dumps(m))


def reseal(pool) -> None:
    """Record the files' current digests in their footers and pool.json: a pool whose manifest
    matches its files but whose contents are bad, as a faulty packer would write it (to reach the
    checks behind the digests)."""

    def fix(m):
        for entry in m["splits"].values():
            for key in ("ids_sha256", "labels_sha256", "group_sha256"):
                entry[key] = []
            for name in entry["files"]:
                table = pq.read_table(pool / name)
                meta = json.loads(table.schema.metadata[FILE_META])
                images = table.column("image").combine_chunks()
                meta["ids_sha256"] = ids_digest(table.column("id"))
                meta["labels_sha256"] = labels_digest(table.column("label"))
                meta["group_sha256"] = [
                    image_digest(raw_images(images.slice(a, ROW_GROUP), tuple(m["image_shape"])))
                    for a in range(0, len(table), ROW_GROUP)
                ]
                new = table.replace_schema_metadata({FILE_META: json.dumps(meta).encode()})
                pq.write_table(new, pool / name, row_group_size=ROW_GROUP)
                for key in ("ids_sha256", "labels_sha256", "group_sha256"):
                    entry[key].append(meta[key])

    edit_manifest(pool, fix)


@pytest.fixture
def small_pool(packed, tmp_path):
    """A copy of the packed pool to damage."""
    out = tmp_path / "pool"
    shutil.copytree(packed, out)
    return out


def run_argv(pool, out) -> list[str]:
    return ["run", "--dataset", f"parquet:{pool}", "--class-counts", "0:60,1:300,2:60", "--init", "20",
            "--batch", "10", "--rounds", "1", "--epochs", "1", "--backend", "local", "--out", str(out)]  # fmt: skip


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_missing_and_non_pool_paths(tmp_path, capsys):
    assert main(run_argv(tmp_path / "nope", tmp_path / "r1")) == 2
    assert "does not exist: create it with `fm-ray pack" in one_line_error(capsys)
    (tmp_path / "junk").mkdir()
    assert main(run_argv(tmp_path / "junk", tmp_path / "r2")) == 2
    assert "is not an fm_ray pool" in one_line_error(capsys)


def test_duplicate_ids(small_pool, tmp_path, capsys):
    test_file = small_pool / "test" / "part-00000.parquet"
    rewrite(test_file, lambda t: t.set_column(0, "id", pa.array([f"train/{i}" for i in range(len(t))])))
    reseal(small_pool)
    data = open_source(DataConfig(dataset=f"parquet:{small_pool}"))  # a run reads no ids: nothing to check
    with pytest.raises(UserError, match="has the id 'train/0' more than once"):
        data.train.ids[0]  # whatever reads the ids (projects, fm_ray.select) checks them


def test_file_changed_after_packing(small_pool, tmp_path, capsys):
    rewrite(small_pool / "train" / "part-00001.parquet", lambda t: t.slice(0, 100))
    assert main(run_argv(small_pool, tmp_path / "r")) == 2
    assert "part-00001.parquet holds 100 rows, the manifest says 20000" in one_line_error(capsys)


def damage_first_row_group_images(pool) -> None:
    """Zero the start of row group 0's image pages in train/part-00000; ids, labels and footer stay readable."""
    path = pool / "train" / "part-00000.parquet"
    col = pq.ParquetFile(path).metadata.row_group(0).column(1)
    start = col.dictionary_page_offset or col.data_page_offset
    blob = bytearray(path.read_bytes())
    blob[start : start + 256] = bytes(256)
    path.write_bytes(bytes(blob))


def test_unreadable_row_range_names_the_rows(small_pool, tmp_path, capsys):
    damage_first_row_group_images(small_pool)
    with pytest.raises(UserError, match=r"rows 0-1023 of train \(train/part-00000.parquet\) cannot be read"):
        open_pool(str(small_pool)).images("train").read(np.array([3]))
    assert main(run_argv(small_pool, tmp_path / "r")) == 2
    assert "cannot be read" in one_line_error(capsys)


def other_pixels_same_footer(pool) -> None:
    """train/part-00000 written again with row 5's pixels inverted: rows, schema, row groups and
    footer (digests included) as packed, so only the pixels themselves tell."""

    def invert_row_5(t):
        images = t.column("image").to_pylist()
        images[5] = bytes(255 - b for b in images[5])
        return t.set_column(1, "image", pa.array(images, pa.binary()))

    rewrite(pool / "train" / "part-00000.parquet", invert_row_5)


@pytest.mark.parametrize("damage", ["unreadable", "other_pixels"])
def test_bad_rows_on_a_ray_shard_fail_fast_with_the_message(small_pool, trained, damage):
    """The shard that reads a file checks what it reads, on its first pass: a damaged or changed
    file is named by the actor, never read as pixels; opening the pool (footers) passes."""
    if damage == "unreadable":
        damage_first_row_group_images(small_pool)
    else:
        other_pixels_same_footer(small_pool)
    images = open_pool(str(small_pool)).images("train").subset(np.arange(560))
    message = (
        "cannot be read"
        if damage == "unreadable"
        else r"train/part-00000.parquet is not the file that was packed \(the images of rows 0-1023 of train differ"
    )
    pool = RayPool(PoolConfig(backend="ray", shards=2), trained["spec"], images)
    try:
        with pytest.raises(UserError, match=message):
            pool.map(nonfinite_outputs)
    finally:
        pool.close()


def test_unlabeled_pool_cannot_run(small_pool, tmp_path, capsys):
    rewrite(
        small_pool / "test" / "part-00000.parquet", lambda t: t.set_column(2, "label", pa.nulls(len(t), pa.int64()))
    )
    reseal(small_pool)
    assert main(run_argv(small_pool, tmp_path / "r")) == 2
    assert "unlabeled test rows" in one_line_error(capsys)


# -- the manifest checked against the files: each case ran to the end with wrong results before --------
def test_swapped_part_files(small_pool, tmp_path, capsys):
    a, b = small_pool / "train" / "part-00000.parquet", small_pool / "train" / "part-00001.parquet"
    a.rename(tmp_path / "x")
    b.rename(a)
    (tmp_path / "x").rename(b)  # same rows, schema and shape: only the bytes tell them apart
    assert main(run_argv(small_pool, tmp_path / "r")) == 2
    assert "train/part-00000.parquet is not the file that was packed" in one_line_error(capsys)


def test_file_rewritten_with_other_labels(small_pool, tmp_path, capsys):
    path = small_pool / "test" / "part-00000.parquet"
    rewrite(path, lambda t: t.set_column(2, "label", pc.subtract(pa.scalar(9, pa.int64()), t.column("label"))))
    open_pool(str(small_pool))  # rows, schema, shape and footer still match the manifest: only the labels differ
    assert main(run_argv(small_pool, tmp_path / "r")) == 2
    assert "test/part-00000.parquet is not the file that was packed" in one_line_error(capsys)


@pytest.mark.parametrize("shape", [[4, 14, 14], [1, 14, 56]])
def test_image_shape_edited_in_the_manifest(small_pool, tmp_path, capsys, shape):
    def edit(m):  # the same bytes per image: read as scrambled pixels unless the files are asked
        m.update(image_shape=shape, mean=m["mean"] * shape[0], std=m["std"] * shape[0])

    edit_manifest(small_pool, edit)
    assert main(run_argv(small_pool, tmp_path / "r")) == 2
    err = one_line_error(capsys)
    assert f"pool.json says the images are {'x'.join(map(str, shape))}, train/part-00000.parquet holds 1x28x28" in err


def test_file_dropped_from_the_manifest_or_the_folder(small_pool, tmp_path, capsys):
    def drop_last(m):
        entry = m["splits"]["train"]
        for key in ("files", "file_rows", "ids_sha256", "labels_sha256", "group_sha256"):
            entry[key] = entry[key][:-1]
        entry["rows"] = sum(entry["file_rows"])

    edit_manifest(small_pool, drop_last)
    assert main(run_argv(small_pool, tmp_path / "r")) == 2
    assert "train/part-00002.parquet is in the pool folder but not in pool.json" in one_line_error(capsys)
    (small_pool / "train" / "part-00002.parquet").unlink()
    (small_pool / "train" / "part-00001.parquet").unlink()
    assert main(run_argv(small_pool, tmp_path / "r2")) == 2
    assert "train/part-00001.parquet is listed in pool.json but missing" in one_line_error(capsys)


def test_classes_edited_in_the_manifest(small_pool, tmp_path, capsys):
    edit_manifest(small_pool, lambda m: m.update(classes=m["classes"][:5]))
    assert main(run_argv(small_pool, tmp_path / "r")) == 2
    assert "pool.json's classes (['T-shirt/top'" in one_line_error(capsys)


def test_labels_outside_the_classes(small_pool, tmp_path, capsys):
    rewrite(small_pool / "test" / "part-00000.parquet", lambda t: t.set_column(2, "label", pa.array([12] * len(t))))
    reseal(small_pool)  # a faulty packer: footers and manifest agree with the bad labels
    assert main(run_argv(small_pool, tmp_path / "r")) == 2
    assert "holds the label 12, outside the 10 classes of pool.json" in one_line_error(capsys)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(std=[-m["std"][0]]), "or std [-0.35"),
        (lambda m: m.update(mean=[0.5]), "are not the ones its images were packed with"),
        (lambda m: m.update(std=[m["std"][0] * 1.01]), "are not the ones its images were packed with"),
        (lambda m: m.update(mean=[float("nan")]), "is out of range"),
        (lambda m: m.update(augment=True), "pool.json's augment (True) are not what"),
    ],
    ids=["negative-std", "other-mean", "other-std", "nan-mean", "augment"],
)
def test_normalization_and_augment_edited_in_the_manifest(small_pool, tmp_path, capsys, edit, message):
    """Nothing in pool.json is trusted alone: each field is checked against what the footers record."""
    edit_manifest(small_pool, edit)
    assert main(run_argv(small_pool, tmp_path / "r")) == 2
    err = one_line_error(capsys)
    assert message in err, err


def test_a_file_with_other_columns(small_pool, tmp_path, capsys):
    rewrite(
        small_pool / "test" / "part-00000.parquet", lambda t: t.set_column(2, "label", pc.cast(t["label"], pa.int32()))
    )
    assert main(run_argv(small_pool, tmp_path / "r")) == 2
    assert "test/part-00000.parquet has the columns (id: string, image: binary, label: int32)" in one_line_error(capsys)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "is not an fm_ray pool manifest"),
        ("[1, 2]", "is not an fm_ray pool manifest"),
        (lambda m: m.pop("splits"), "damaged (splits is missing)"),
        (lambda m: m.pop("mean"), "damaged (mean is missing or not 1 number per channel)"),
        (lambda m: m["splits"].pop("train"), "damaged (splits has no train entry)"),
        (
            lambda m: m["splits"]["train"].pop("group_sha256"),
            "lacks files, file_rows, ids_sha256, labels_sha256 and group",
        ),
        (lambda m: m["splits"]["train"]["files"].__setitem__(0, "../../etc/passwd"), "not a file of train/"),
        (lambda m: m.update(version=1), "format v1, packed by an older fm_ray: pack it again"),
        (lambda m: m.update(version=2), "format v2, packed by an older fm_ray: pack it again"),
    ],
    ids=["not-json", "list", "no-splits", "no-mean", "no-train", "no-digests", "outside", "v1", "v2"],
)
def test_damaged_manifest_is_one_line(small_pool, tmp_path, capsys, text, message):
    if callable(text):
        edit_manifest(small_pool, text)
    else:
        (small_pool / "pool.json").write_text(text)
    assert main(run_argv(small_pool, tmp_path / "r")) == 2
    err = one_line_error(capsys)
    assert message in err, err
    if "older fm_ray" in message:
        assert "`fm-ray pack fashion_mnist NEW_FOLDER`" in err


def test_opening_reads_footers_and_the_driver_reads_labels_only(small_pool):
    READ_BYTES.clear()
    pool = open_pool(str(small_pool))
    assert set(READ_BYTES) == {"footer"}  # opening: every file's footer, nothing else
    pool.labels("train")
    pool.labels("test")
    assert set(READ_BYTES) == {"footer", "label"}  # a run's driver: labels only, no ids, no pixels
    pool.columns("train")
    assert "image" not in READ_BYTES and READ_BYTES["id"] > 0
    files = [f for f in small_pool.glob("*/part-*.parquet")]
    image_bytes = sum(
        pq.ParquetFile(f).metadata.row_group(g).column(1).total_compressed_size
        for f in files
        for g in range(pq.ParquetFile(f).metadata.num_row_groups)
    )
    assert READ_BYTES["id"] + READ_BYTES["label"] < image_bytes / 20  # ids and labels: a sliver of a pool's bytes


def test_a_file_changed_while_a_process_reads_the_pool_is_refused(small_pool):
    """Every read is checked, not the first one in a process: part files renamed in a cycle (same
    rows, footers that match their own contents) between two reads are caught on the next read."""
    images = open_pool(str(small_pool)).images("train")
    rows = np.array([5, 20_005, 40_005])  # one row in each file
    first = images.read(rows)
    images.close()
    names = [small_pool / "train" / f"part-0000{i}.parquet" for i in range(3)]

    def cycle():  # each file takes the next one's name (three cycles: back where they were)
        names[0].rename(small_pool / "x")
        names[1].rename(names[0])
        names[2].rename(names[1])
        (small_pool / "x").rename(names[2])

    cycle()
    with pytest.raises(UserError, match=r"train/part-00000.parquet is not the file that was packed"):
        images.read(rows)
    cycle()
    cycle()
    assert torch.equal(images.read(rows), first)


def test_relative_pool_path_is_made_absolute_for_trials(tmp_path, monkeypatch):
    from fm_ray.config.flags import absolute_pool

    monkeypatch.chdir(tmp_path)
    assert absolute_pool("parquet:pools/x") == f"parquet:{tmp_path}/pools/x"
    assert absolute_pool("parquet:s3://bucket/x") == "parquet:s3://bucket/x"
    assert absolute_pool("fashion_mnist") == "fashion_mnist"


def test_dry_run_on_a_packed_pool_plans_streaming_and_reads_no_pixels(packed, tmp_path, capsys):
    READ_BYTES.clear()
    argv = ["run", "--dataset", f"parquet:{packed}", "--strategy", "kcenter", "--backend", "ray", "--shards", "2"]
    assert main([*argv, "--dry-run", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert READ_BYTES["image"] == 0  # sizes, labels and the model only
    assert "one decoded row group (1024 x 784 B (streamed))" in out and "pixels held" not in out
    assert "pool samples on 2 shard(s)" in out and "largest process: the shard" in out


@pytest.mark.slow
def test_part_files_renamed_between_rounds_of_a_run_stop_it_with_one_line(small_pool, tmp_path, capsys):
    """The issue's case: a run reads the pool again each round; files renamed in a cycle after
    round 0 (same row counts) stop it at round 1 with one line, round 0 kept, never other pixels."""
    names = [small_pool / "train" / f"part-0000{i}.parquet" for i in range(3)]

    def cycle(row):
        if row["round"] == 0:
            names[0].rename(small_pool / "x")
            names[1].rename(names[0])
            names[2].rename(names[1])
            (small_pool / "x").rename(names[2])

    cfg = dataclasses.replace(small_cfg(f"parquet:{small_pool}", backend="local", shards=1), rounds=2)
    with pytest.raises(UserError, match=r"is not the file that was packed \(the images of rows"):
        run_experiment(cfg, tmp_path / "r", on_round=cycle)
    assert pq.read_table(tmp_path / "r" / "rounds.parquet").column("round").to_pylist() == [0]
