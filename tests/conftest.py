"""Shared test set-up: real data from $FM_RAY_DATA (default: where `fm-ray run` looks, the user cache's
data folder), a repo-local cache, no downloads."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from fm_ray.data.builtin import data_root

ROOT = Path(__file__).resolve().parents[1]
# fm_ray's own rule, taken before the cache moves into the repository (the data stays where it was)
os.environ.setdefault("FM_RAY_DATA", str(data_root(None)))
os.environ.setdefault("FM_RAY_CACHE", str(ROOT / ".cache" / "fm_ray"))
os.environ["FM_RAY_OFFLINE"] = "1"  # a missing dataset must fail fast, never hang on a download


@pytest.fixture(scope="session")
def fmnist():
    from fm_ray.config import DataConfig
    from fm_ray.data.registry import open_source

    return open_source(DataConfig(dataset="fashion_mnist"))


@pytest.fixture(scope="session")
def trained(fmnist):
    """A small CNN trained briefly on real FashionMNIST, and a 560-image pool with 60 labeled."""
    import numpy as np
    import torch

    from fm_ray.config import ModelConfig, StrategyConfig, TrainConfig
    from fm_ray.data.normalize import Normalizer
    from fm_ray.model.train import train_model
    from fm_ray.model.zoo import build_model
    from fm_ray.pool.shard import ShardSpec
    from fm_ray.strategies import QueryContext

    norm = Normalizer((0.2860,), (0.3530,))
    x_pool = fmnist.train_x[:560]
    labeled = np.arange(0, 560, 10)  # 56 labeled, spread over the pool
    torch.manual_seed(0)
    model = build_model(ModelConfig("cnn"), 1, 28, 10)
    lab = torch.from_numpy(labeled)
    train_model(
        model, x_pool[lab], fmnist.train_y[:560][lab], norm, False, TrainConfig(epochs=3), torch.device("cpu"), 0
    )
    spec = ShardSpec(ModelConfig("cnn"), 1, 28, 10, norm, "cpu")
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    def context(strategy: str, k: int = 8, **kw) -> QueryContext:
        labels = fmnist.train_y[:560][lab].numpy()
        return QueryContext(1, k, 0, labeled, 560, StrategyConfig(name=strategy, **kw), model, labels)

    return {"spec": spec, "x_pool": x_pool, "weights": weights, "labeled": labeled, "context": context}


def _fm_ray_until(
    argv: Sequence[str], ready: Callable[[], bool], act: Callable[[subprocess.Popen], None], wait_s: float = 300
) -> tuple[int, str, str]:
    """Start the console command `fm-ray argv` as users do (the watched child under its watcher), wait
    for the state `ready()` (files on disk, never a time: the ceiling only stops a hang), `act(proc)`
    on it (a signal, a kill), and return its (exit code, stdout, stderr) once it ended."""
    command = Path(sys.executable).with_name("fm-ray")
    command = command if command.exists() else Path(shutil.which("fm-ray") or "fm-ray")
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:  # no pipe to fill up
        proc = subprocess.Popen([str(command), *argv], stdout=out, stderr=err, text=True)
        try:
            deadline = time.monotonic() + wait_s
            while not ready() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert proc.poll() is None, (proc.returncode, err.seek(0), err.read())
            act(proc)
            proc.wait(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read(), err.read()


@pytest.fixture
def fm_ray_until() -> Callable[..., tuple[int, str, str]]:
    """The console command, run until a state, acted on, and ended (see `_fm_ray_until`)."""
    return _fm_ray_until


@pytest.fixture(autouse=True)
def _fm_ray_logging_as_it_was():
    """`main()` configures the fm_ray logger for the whole process (as `fm-ray` does): undo it after
    each test, so whether a test sees fm_ray's lines never depends on the tests before it."""
    from fm_ray._internal.log import LOGGER

    handlers, level, propagate = list(LOGGER.handlers), LOGGER.level, LOGGER.propagate
    yield
    LOGGER.handlers[:] = handlers
    LOGGER.setLevel(level)
    LOGGER.propagate = propagate


@pytest.fixture
def labels_csv(tmp_path):
    """Write an annotator's answers as `fm-ray project import` reads them: a file `name` in
    tmp_path with an `id,label` header and one row per (id, label); returns its path."""

    def write(name: str, rows) -> Path:
        path = tmp_path / name
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "label"])
            w.writerows(rows)
        return path

    return write


@pytest.fixture
def tiny_cfg(fmnist):
    """A builder of tiny run configs (220 FashionMNIST images of 3 classes, 1 epoch, local pool): the
    end-to-end checks of stopping and cold start."""
    from fm_ray.config import DataConfig, PoolConfig, RunConfig, StrategyConfig, TrainConfig

    data = DataConfig(dataset="fashion_mnist", setting="custom", class_counts=((3, 60), (7, 100), (9, 60)))

    def build(**kw) -> RunConfig:
        base = {
            "data": data,
            "train": TrainConfig(epochs=1, device="cpu"),
            "strategy": StrategyConfig(name="entropy"),
            "pool": PoolConfig(backend="local"),
            "init": 20,
            "batch": 10,
            "rounds": 3,
            "seed": 2,
            "stop_set": 50,
        }
        return RunConfig(**(base | kw))

    return build


@pytest.fixture
def tiny_project(tmp_path):
    """A labeling project on a `folder:` pool of ten random 8x8 grey PNGs `0.png` .. `9.png`, classes
    cat,dog (made through `fm-ray project init`, in-process: no training, no Ray)."""
    import numpy as np
    from PIL import Image

    from fm_ray.cli import main

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(imgs / f"{i}.png")
    proj = tmp_path / "proj"
    assert main(["project", "init", str(proj), "--pool", f"folder:{imgs}", "--classes", "cat,dog"]) == 0
    return proj


TRACEBACK = "Traceback (most recent call last)"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """No test prints a traceback unless it says it may (`@pytest.mark.traceback`: an internal
    error's -v, FM_RAY_DEBUG, a fault injected into Ray's own workers): a user error, an environment
    failure or an interruption reaching the user as a traceback fails the test that saw it. Checks
    what pytest captured from this process (fm_ray's lines, logging, Tune's), not Ray's forwarded
    worker output."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.passed or item.get_closest_marker("traceback"):
        return
    printed = "\n".join(text for name, text in report.sections if name.startswith("Captured"))
    # this process's own tracebacks: lines Ray forwards from its workers start "(trial pid=...)" (a
    # worker torn down at shutdown may print one; fm-ray's commands do not forward worker output)
    own = [line for line in printed.splitlines() if line.lstrip().startswith(TRACEBACK)]
    if own:
        at = printed.index(own[0])
        report.outcome = "failed"
        report.longrepr = (
            f"the test passed but printed a traceback (mark it `traceback` if it must):\n{printed[at : at + 3000]}"
        )
