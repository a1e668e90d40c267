"""Labeling projects under concurrency and edits: one command writes at a time (a second waits,
saying so), batch numbers come from a durable counter, deleted batch folders and images removed
from the pool's folder never trace back; Label Studio tasks carry the pick order; imports follow
Label Studio's export format (only the project's control counts); `next` reports the hold-out."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
from filelock import FileLock

from fm_ray.cli import main
from fm_ray.errors import UserError
from fm_ray.project.labels import read_label_file
from fm_ray.project.project import Project, pick_score

FLAGS = ["--model", "cnn", "--strategy", "entropy", "--epochs", "1", "--backend", "local", "--device", "cpu"]
NAMES = "a,b,c,d,e,f,g,h,i,j"


@pytest.fixture
def project(fmnist, tmp_path):
    """A project on a folder of 60 real FashionMNIST PNGs (ids are relative paths), with its truth."""
    from PIL import Image

    root, truth = tmp_path / "images", {}
    root.mkdir()
    for i in range(60):
        Image.fromarray(fmnist.train_x[i, 0].numpy()).save(root / f"{i:03d}.png")
        truth[f"{i:03d}.png"] = NAMES.split(",")[int(fmnist.train_y[i])]
    proj = tmp_path / "proj"
    assert (
        main(["project", "init", str(proj), "--pool", f"folder:{root}", "--classes", NAMES, *FLAGS, "--holdout", "0.3"])
        == 0
    )
    return proj, root, truth


def label_ids(proj):
    with open(proj / "labels.csv") as f:
        return [r["id"] for r in csv.DictReader(f)]


def cli(*args):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.Popen(
        [sys.executable, "-m", "fm_ray.cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_concurrent_imports_lose_no_label(project, labels_csv):
    proj, _, truth = project
    ids = sorted(truth)
    expected: list[str] = []
    for trial in range(4):  # three imports at once, four times over
        files = []
        for j in range(3):
            chunk = ids[trial * 12 + j * 4 : trial * 12 + j * 4 + 4]
            expected += chunk
            files.append(labels_csv(f"t{trial}-{j}.csv", [(i, truth[i]) for i in chunk]))
        procs = [cli("project", "import", str(proj), str(f)) for f in files]
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
        assert sorted(label_ids(proj)) == sorted(expected)


def test_a_second_command_waits_for_the_lock_and_says_so(project, labels_csv):
    proj, _, truth = project
    f = labels_csv("l.csv", [("000.png", truth["000.png"])])
    lock = FileLock(proj / "project.lock")
    lock.acquire()
    try:
        p = cli("project", "import", str(proj), str(f))
        line = p.stdout.readline()  # the state it waits in: its message, before it writes anything
        assert "is busy (another fm-ray project command holds project.lock): waiting for it" in line
        assert label_ids(proj) == []
    finally:
        lock.release()
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert label_ids(proj) == ["000.png"]


def test_batch_numbers_survive_a_deleted_batch_folder(project):
    proj, _, _ = project
    for _ in range(2):
        assert main(["project", "next", str(proj), "--k", "5"]) == 0
    shutil.rmtree(proj / "batches" / "0")  # was: the next batch numbered by the count of folders -> OSError
    assert main(["project", "next", str(proj), "--k", "5"]) == 0
    assert sorted(os.listdir(proj / "batches")) == ["1", "2"]
    assert json.loads((proj / "counter.json").read_text()) == {"next_batch": 3}
    (proj / "counter.json").unlink()  # a project from before the counter: the folders tell
    assert Project(proj).next_batch() == 3


def test_removed_images_drop_out_and_the_hold_out_is_reported(project, capsys, labels_csv):
    proj, root, truth = project
    assert main(["project", "next", str(proj), "--k", "20"]) == 0
    with open(proj / "batches" / "0" / "batch.csv") as f:
        sent = [r["id"] for r in csv.DictReader(f)]
    labeled, unlabeled = sent[:15], sent[15:]
    assert main(["project", "import", str(proj), str(labels_csv("l.csv", [(i, truth[i]) for i in labeled]))]) == 0
    (root / labeled[0]).unlink()  # a labeled image removed from the folder (was: KeyError)
    (root / unlabeled[0]).unlink()  # and one sent out but not labeled yet
    capsys.readouterr()
    assert main(["project", "next", str(proj), "--k", "5"]) == 0
    out = capsys.readouterr().out
    assert f"1 labeled image(s) no longer in the pool are left out: {labeled[0]}" in out
    summary = json.loads((proj / "batches" / "1" / "summary.json").read_text())
    assert summary["n_holdout"] > 0 and f"hold-out accuracy {summary['holdout_accuracy']:.4f}" in out
    assert summary["n_train"] + summary["n_holdout"] == 14
    with open(proj / "batches" / "1" / "batch.csv") as f:
        picked = {r["id"] for r in csv.DictReader(f)}
    assert not picked & set(sent) and labeled[0] not in picked and unlabeled[0] not in picked


def test_tasks_carry_the_rank_and_a_score_monotone_in_pick_order(project, labels_csv):
    proj, _, truth = project
    assert main(["project", "next", str(proj), "--k", "12"]) == 0
    tasks0 = json.loads((proj / "batches" / "0" / "tasks.json").read_text())
    assert [t["data"]["rank"] for t in tasks0] == list(range(12))
    answers = labels_csv("l.csv", [(t["data"]["id"], truth[t["data"]["id"]]) for t in tasks0])
    assert main(["project", "import", str(proj), str(answers)]) == 0
    assert main(["project", "next", str(proj), "--k", "6"]) == 0
    tasks = json.loads((proj / "batches" / "1" / "tasks.json").read_text())
    with open(proj / "batches" / "1" / "batch.csv") as f:
        rows = list(csv.DictReader(f))
    assert [t["data"]["id"] for t in tasks] == [r["id"] for r in rows]  # fm_ray's pick order
    by_score = sorted(tasks, key=lambda t: -t["predictions"][0]["score"])  # Label Studio: score, descending
    assert [t["data"]["rank"] for t in by_score] == list(range(6))
    for t, r in zip(tasks, rows, strict=True):
        assert t["data"]["probability"] == pytest.approx(max(float(r[f"p_{c}"]) for c in NAMES.split(",")), abs=1e-6)
        assert t["data"]["predicted"] == r["predicted"]
    assert [pick_score(r, 4) for r in range(4)] == [1.0, 0.75, 0.5, 0.25]


def export(tmp_path, results):
    """A Label Studio JSON export of one task with one annotation holding `results`."""
    task = {"id": 1, "data": {"id": "000.png", "image": "/x"}, "annotations": [{"id": 7, "result": results}]}
    (tmp_path / "export.json").write_text(json.dumps([task]))
    return tmp_path / "export.json"


def choice(name, value, kind="choices"):
    return {"from_name": name, "to_name": "image", "type": kind, "value": value}


def test_label_studio_export_only_the_projects_control_counts(tmp_path):
    quality = choice("quality", {"choices": ["blurry"]})  # a second <Choices> control: not a disagreement
    notes = choice("notes", ["free", "text"], "textarea")  # another control whose value is a list
    labels = read_label_file(export(tmp_path, [quality, choice("label", {"choices": ["b"]}), notes]))
    assert [(lab.id, lab.label) for lab in labels] == [("000.png", "b")]
    # alone, it is the one single-choice control the results use: its class is read (and an import
    # refuses 'blurry' as an unknown class), never dropped without a word (issue 21)
    assert [lab.label for lab in read_label_file(export(tmp_path, [quality]))] == ["blurry"]
    with pytest.raises(UserError, match="the 'label' result's value is \\['b'\\], not Label Studio's"):
        read_label_file(export(tmp_path, [choice("label", ["b"])]))  # was: AttributeError
    with pytest.raises(UserError, match="one annotation gives 2 classes"):
        read_label_file(export(tmp_path, [choice("label", {"choices": ["a", "b"]})]))
    two = [choice("label", {"choices": ["a"]}), choice("label", {"choices": ["b"]})]
    with pytest.raises(UserError, match="annotations disagree"):
        read_label_file(export(tmp_path, two))
