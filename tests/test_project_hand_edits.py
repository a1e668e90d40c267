"""Projects edited by hand (issue 21, family 7): one rule for a repeated label in every command, and
a deleted batch folder never makes fm_ray send its samples again."""

import csv
import shutil

from fm_ray.cli import main
from fm_ray.project.project import Project


def batch_ids(proj, b):
    with open(proj / "batches" / str(b) / "batch.csv") as f:
        return [r["id"] for r in csv.DictReader(f)]


def test_a_deleted_batch_folder_is_never_sent_again(tiny_project, capsys):
    assert main(["project", "next", str(tiny_project), "--k", "3"]) == 0
    first = batch_ids(tiny_project, 0)
    shutil.rmtree(tiny_project / "batches" / "0")  # labels not back yet: the example
    assert main(["project", "next", str(tiny_project), "--k", "3"]) == 0
    second = batch_ids(tiny_project, 1)
    assert not set(first) & set(second)
    shutil.rmtree(tiny_project / "batches" / "1")
    (tiny_project / "counter.json").unlink()  # and the counter: sent.csv still says what went out
    assert main(["project", "next", str(tiny_project), "--k", "3"]) == 0
    third = batch_ids(tiny_project, 2)
    assert len(set(first) | set(second) | set(third)) == 9
    capsys.readouterr()
    assert main(["project", "next", str(tiny_project), "--k", "2"]) == 2  # 1 of 10 left
    assert "1 pool samples are not yet sent out" in capsys.readouterr().err
    assert main(["project", "status", str(tiny_project)]) == 0
    assert "(9 sent out and not labeled yet)" in capsys.readouterr().out


def test_labels_of_a_deleted_batch_still_import_with_their_batch(tiny_project, labels_csv):
    assert main(["project", "next", str(tiny_project), "--k", "2"]) == 0
    ids = batch_ids(tiny_project, 0)
    shutil.rmtree(tiny_project / "batches" / "0")
    assert main(["project", "import", str(tiny_project), str(labels_csv("l.csv", [(i, "cat") for i in ids]))]) == 0
    assert {r["id"]: r["batch"] for r in Project(tiny_project).labels()} == dict.fromkeys(ids, "0")


def test_a_label_file_repeating_a_row_follows_the_labels_csv_rule(tiny_project, labels_csv, capsys):
    same = labels_csv("same.csv", [("0.png", "cat"), ("0.png", "cat"), ("1.png", "dog")])
    assert main(["project", "import", str(tiny_project), str(same)]) == 0  # identical repeats: one label
    assert Project(tiny_project).label_map() == {"0.png": "cat", "1.png": "dog"}
    other = labels_csv("other.csv", [("2.png", "cat"), ("2.png", "dog")])
    assert main(["project", "import", str(tiny_project), str(other)]) == 2  # never "the last (or first) wins"
    assert "line 3: id '2.png' is labeled 'dog' but already 'cat'" in capsys.readouterr().err
    assert "2.png" not in Project(tiny_project).label_map()
