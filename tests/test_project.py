"""Labeling projects: a scripted annotator through CSV files gets exactly `fm-ray run`'s picks; imports
are validated whole (one line naming file and line, nothing written); batches are atomic."""

import csv
import json

import pyarrow.parquet as pq
import pytest

from fm_ray.cli import main
from fm_ray.project.labels import Label, check_labels, read_label_file
from fm_ray.project.project import Project

RUN = ["--class-counts", "0:60,1:300,2:60", "--model", "cnn", "--epochs", "1", "--seed", "4", "--backend", "local"]
RUN += ["--device", "cpu"]
CLASSES = "tshirt,trouser,pullover"


def batch_ids(project_dir, b):
    with open(project_dir / "batches" / str(b) / "batch.csv") as f:
        return [r["id"] for r in csv.DictReader(f)]


def annotate(project_dir, b, truth, labels_csv):
    """The instant annotator: answers every id of batch b with its true class, as a CSV file."""
    names = CLASSES.split(",")
    rows = [(i, names[truth[i]]) for i in batch_ids(project_dir, b)]
    return labels_csv(f"labels-{b}.csv", rows)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fishermask", "badge"])
def test_project_with_instant_annotator_picks_what_run_picks(strategy, fmnist, tmp_path, labels_csv):
    extra = ["--strategy", strategy, "--sparsity", "0.01"]
    out = tmp_path / "run"
    assert main(["run", *RUN, *extra, "--init", "20", "--batch", "10", "--rounds", "2", "--out", str(out)]) == 0
    queries = pq.read_table(out / "queries.parquet").to_pylist()

    proj = tmp_path / "proj"
    assert main(["project", "init", str(proj), "--pool", "fashion_mnist", "--classes", CLASSES, *RUN, *extra]) == 0
    truth = {str(i): int(fmnist.train_y[i]) for i in range(len(fmnist.train_y))}  # classes 0..2 keep their index
    for b, k in enumerate([20, 10, 10]):
        assert main(["project", "next", str(proj), "--k", str(k)]) == 0
        assert main(["project", "import", str(proj), str(annotate(proj, b, truth, labels_csv))]) == 0
        if b > 0:  # batch b is the run's query of round b - 1, written with round = b
            assert sorted(batch_ids(proj, b)) == sorted(str(q["dataset_index"]) for q in queries if q["round"] == b)
    rounds = pq.read_table(out / "rounds.parquet").to_pylist()
    initial = set(batch_ids(proj, 0))
    assert len(initial) == rounds[0]["n_labeled"] == 20
    assert not initial & {str(q["dataset_index"]) for q in queries}
    assert Project(proj).status()["labels"] == 40


@pytest.fixture
def folder_project(fmnist, tmp_path):
    """A project on a folder of 120 real FashionMNIST PNGs in sub-folders (ids are relative paths)."""
    from PIL import Image

    root, truth = tmp_path / "images", {}
    for i in range(120):
        (root / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(fmnist.train_x[i, 0].numpy()).save(root / f"d{i % 2}" / f"{i:03d}.png")
        truth[f"d{i % 2}/{i:03d}.png"] = int(fmnist.train_y[i])
    proj = tmp_path / "proj"
    names = "a,b,c,d,e,f,g,h,i,j"
    flags = ["--model", "cnn", "--strategy", "entropy", "--epochs", "1", "--backend", "local", "--device", "cpu"]
    assert main(["project", "init", str(proj), "--pool", f"folder:{root}", "--classes", names, *flags]) == 0
    return proj, truth, names.split(",")


def test_folder_project_round_trip_and_validation(folder_project, tmp_path, capsys, labels_csv):
    proj, truth, names = folder_project
    assert main(["project", "next", str(proj), "--k", "15"]) == 0
    first = batch_ids(proj, 0)
    assert len(first) == 15 and all(i in truth for i in first)
    good = labels_csv("good.csv", [(i, names[truth[i]]) for i in first])
    store = (proj / "labels.csv").read_bytes()

    bad_cases = [
        ([("nope.png", "a")], "line 2: unknown id 'nope.png'"),
        ([(first[0], names[truth[first[0]]]), (first[1], "zebra")], "line 3: unknown class 'zebra'"),
        ([(first[0], "a"), (first[0], "b")], "line 3: id"),
    ]
    for rows, message in bad_cases:
        capsys.readouterr()
        assert main(["project", "import", str(proj), str(labels_csv("bad.csv", rows))]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "bad.csv" in err, err
        assert (proj / "labels.csv").read_bytes() == store  # nothing written
    (tmp_path / "malformed.csv").write_text("id,label\nonly-an-id\n")
    assert main(["project", "import", str(proj), str(tmp_path / "malformed.csv")]) == 2
    assert "malformed.csv line 2" in capsys.readouterr().err

    assert main(["project", "import", str(proj), str(good)]) == 0
    assert main(["project", "import", str(proj), str(good)]) == 0  # re-import: nothing changes
    assert len(Project(proj).labels()) == 15
    wrong = labels_csv("conflict.csv", [(first[0], names[(truth[first[0]] + 1) % 10])])
    assert main(["project", "import", str(proj), str(wrong)]) == 2
    assert "already" in capsys.readouterr().err

    assert main(["project", "next", str(proj), "--k", "15"]) == 0
    second = batch_ids(proj, 1)
    assert len(second) == 15 and not set(second) & set(first)
    tasks = json.loads((proj / "batches" / "1" / "tasks.json").read_text())
    assert [t["data"]["id"] for t in tasks] == second
    assert all(t["predictions"][0]["result"][0]["value"]["choices"][0] in names for t in tasks)
    with open(proj / "batches" / "1" / "batch.csv") as f:
        row = next(csv.DictReader(f))
    assert sum(float(row[f"p_{c}"]) for c in names) == pytest.approx(1, abs=1e-4)
    capsys.readouterr()
    assert main(["project", "status", str(proj)]) == 0
    out = capsys.readouterr().out
    assert "labels: 15 (15 sent out and not labeled yet); batches: 2" in out


def test_a_failed_next_leaves_no_half_batch(folder_project, monkeypatch):
    proj, _, _ = folder_project

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("fm_ray.project.project._write_json", boom)
    with pytest.raises(RuntimeError):
        Project(proj).next(5)
    assert not (proj / "batches").exists() or not any((proj / "batches").iterdir())
    monkeypatch.undo()
    Project(proj).next(5)
    assert len(batch_ids(proj, 0)) == 5


def test_label_studio_export_parsing(tmp_path):
    """The structure of a real Label Studio JSON export (see tests/test_labelstudio.py for the server)."""
    export = [
        {"id": 1, "data": {"id": "x/1.png", "image": "/i/1.png"},
         "annotations": [{"result": [{"value": {"choices": ["cat"]}, "from_name": "label", "to_name": "image",
                                      "type": "choices"}], "was_cancelled": False,
                          "prediction": {"result": [{"value": {"choices": ["dog"]}}]}}]},
        {"id": 2, "data": {"id": "x/2.png"}, "annotations": [{"result": [], "was_cancelled": True}]},
        {"id": 3, "data": {"id": "x/3.png"}, "annotations": []},
    ]  # fmt: skip
    path = tmp_path / "export.json"
    path.write_text(json.dumps(export))
    assert read_label_file(path) == [Label("x/1.png", "cat", f"{path} task 1")]
    path.write_text(json.dumps([{"data": {}, "annotations": []}]))
    with pytest.raises(Exception, match="task 1: no data.id"):
        read_label_file(path)


def test_check_labels_rules():
    labels = [Label("a", "cat", "f line 2"), Label("b", "dog", "f line 3"), Label("a", "cat", "f line 4")]
    assert check_labels(labels, {}, {"a", "b"}, ["cat", "dog"]) == {"a": "cat", "b": "dog"}
    assert check_labels(labels, {"a": "cat"}, {"a", "b"}, ["cat", "dog"]) == {"b": "dog"}
    with pytest.raises(Exception, match="f line 2: id 'a' is labeled 'cat' but already 'dog'"):
        check_labels(labels, {"a": "dog"}, {"a", "b"}, ["cat", "dog"])


def test_next_prints_the_stopping_criteria(folder_project, caplog, labels_csv, monkeypatch):
    import numpy as np

    from fm_ray.core import stopping

    proj, truth, names = folder_project
    for b in range(3):
        caplog.clear()
        if b == 2:  # kappa's window needs 3 pairs: make it hold, to see the verdict's line
            monkeypatch.setattr(stopping, "kappa_average", lambda preds_R_N, n_classes: (True, 0.995))
        assert main(["project", "next", str(proj), "--k", "10"]) == 0
        err = caplog.text
        assert main(["project", "import", str(proj), str(annotate_as(proj, b, truth, names, labels_csv))]) == 0
        if b == 0:
            assert "stopping criteria" not in err  # no model yet
    summaries = [json.loads((proj / "batches" / str(b) / "summary.json").read_text()) for b in (1, 2)]
    preds = [np.load(proj / "batches" / str(b) / "stop_preds.npy") for b in (1, 2)]
    assert len(preds[0]) == 120  # the whole pool: the default --stop-set 1000 is larger
    changed = float(np.mean(preds[1] != preds[0]))
    assert summaries[0]["stopping"]["classification_change"] == {"value": None, "holds": False}
    assert summaries[1]["stopping"]["classification_change"] == {"value": changed, "holds": changed == 0}
    assert summaries[1]["stopping"]["budget"] == {"value": 20.0, "holds": False}
    assert "batch 2: stopping criteria on 120 pool samples: kappa_average 0.995 (holds), overall_uncertainty " in err
    assert f"classification_change {changed:.4g}" in err and "budget 20\n" in err
    assert "batch 2: kappa_average hold(s): labeling more is unlikely to change the model" in err


def annotate_as(project_dir, b, truth, names, labels_csv):
    """The instant annotator of a folder project (class names, not indices)."""
    return labels_csv(f"labels-{b}.csv", [(i, names[truth[i]]) for i in batch_ids(project_dir, b)])


def test_a_cold_start_project_picks_the_runs_initial_set(fmnist, tmp_path):
    cold = ["--strategy", "entropy", "--init-strategy", "typiclust", "--stop-set", "20"]
    out = tmp_path / "run"
    assert main(["run", *RUN, *cold, "--init", "10", "--batch", "10", "--rounds", "1", "--out", str(out)]) == 0
    initial = sorted(
        str(q["dataset_index"]) for q in pq.read_table(out / "queries.parquet").to_pylist() if q["round"] == 0
    )
    proj = tmp_path / "proj"
    assert main(["project", "init", str(proj), "--pool", "fashion_mnist", "--classes", CLASSES, *RUN, *cold]) == 0
    assert main(["project", "next", str(proj), "--k", "10"]) == 0
    assert sorted(batch_ids(proj, 0)) == initial and len(initial) == 10
