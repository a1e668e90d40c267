"""What a label and an id are, defined once (issue 21, family 5): NFC text, no invisible characters or
surrounding whitespace, class indices `[0-9]+` never mixed with names, paths compared normalized; the
same rule for `csv:` sources, label CSVs and Label Studio exports. File names that are not UTF-8
are refused in one line naming the file."""

import json
import os
import shutil
import unicodedata

import numpy as np
import pytest
from PIL import Image

from fm_ray.cli import main
from fm_ray.data.labels import check_not_mixed, clean_id, clean_text
from fm_ray.data.registry import open_source
from fm_ray.errors import UserError
from fm_ray.project.project import Project


def images(folder, n=4):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / f"{i}.png")


def csv_source(tmp_path, rows: str) -> str:
    images(tmp_path / "img")
    (tmp_path / "img" / "l.csv").write_text("path,label\n" + rows, encoding="utf-8")
    return f"csv:{tmp_path / 'img' / 'l.csv'}"


@pytest.mark.parametrize(
    "rows, problem",
    [
        # the example: one `+1` among integers made every label a name (4 classes)
        ("0.png,0\n1.png,1\n2.png,+1\n3.png,0\n", "line 4: label '+1' is not an integer label ([0-9]+)"),
        ("0.png,0\n1.png,1\n2.png,\u00b9\n3.png,0\n", "line 4: label '¹' is not an integer label"),  # crashed
        ("0.png,cat\n1.png,dog\n2.png,7\n3.png,cat\n", "line 4: label '7' is an integer label among class names"),
        (
            "0.png,cat\n1.png,dog\n2.png,dog\u200b\n3.png,cat\n",
            "line 4: label 'dog\\u200b' holds invisible character(s) U+200B",
        ),
        ("0.png,cat\n1.png,\ufeffdog\n", "line 3: label '\\ufeffdog' holds invisible character(s) U+FEFF"),
        ("0.png,golden\u00a0retriever\n1.png,cat\n", "line 2: label 'golden\\xa0retriever' holds invisible"),
        ("0.png,cat\n1.png, dog\n", "line 3: label ' dog' has whitespace around it"),
        (
            "./0.png,cat\n0.png,dog\n1.png,dog\n",
            "lists 0.png twice, lines 2 and 3 ('./0.png', '0.png') with labels 'cat' and 'dog'",
        ),
        ("sub/../1.png,cat\n1.png,cat\n", "lists 1.png twice, lines 2 and 3"),
    ],
)
def test_csv_source_labels_and_paths_follow_one_definition(rows, problem, tmp_path, capsys):
    spec = csv_source(tmp_path, rows)
    with pytest.raises(UserError) as e:
        open_source(spec)
    assert problem in str(e.value), str(e.value)
    assert main(["pack", spec, str(tmp_path / "pool")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and problem in err


def test_nfc_and_nfd_spellings_are_one_class_and_names_with_digits_stay_names(tmp_path):
    nfd = unicodedata.normalize("NFD", "café")
    data = open_source(csv_source(tmp_path, f"0.png,café\n1.png,{nfd}\n2.png,x²\n3.png,x2\n"))
    assert data.classes == ("café", "x2", "x²") and data.train.labels.tolist() == [0, 0, 2, 1]
    assert data.train.ids == ["0.png", "1.png", "2.png", "3.png"]


def test_the_definition_itself():
    assert clean_id("./a/./b.jpg", "w") == "a/b.jpg" == clean_id("a//b.jpg", "w")
    assert clean_text(unicodedata.normalize("NFD", "é"), "w") == "é"
    assert check_not_mixed(["0", "12"], ["a", "b"]) and not check_not_mixed(["cat", "+1", "-1"], ["a", "b", "c"])
    for bad in ("", " x", "x\t", "a\u200db", "a\x00"):
        with pytest.raises(UserError, match="row 9"):
            clean_text(bad, "row 9")


@pytest.mark.parametrize(
    "rows, problem",
    [
        ([("0.png", "dog\u200b")], "line 2: label 'dog\\u200b' holds invisible character(s) U+200B"),
        ([("0.png", "cat "), ("1.png", "dog")], "line 2: label 'cat ' has whitespace around it"),
        ([("./0.png", "cat"), ("0.png", "dog")], "id '0.png' is labeled 'dog' but already 'cat'"),
    ],
)
def test_label_csvs_follow_the_same_definition(rows, problem, tiny_project, labels_csv, capsys):
    assert main(["project", "import", str(tiny_project), str(labels_csv("l.csv", rows))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and problem in err, err
    assert Project(tiny_project).label_map() == {}


def test_normalized_ids_match_the_pool_in_label_csvs_and_label_studio(tiny_project, labels_csv, tmp_path, capsys):
    assert main(["project", "import", str(tiny_project), str(labels_csv("l.csv", [("./0.png", "cat")]))]) == 0
    task = {"id": 1, "data": {"id": "./1.png"}, "annotations": [{"result": [
        {"from_name": "choice", "to_name": "image", "type": "choices", "value": {"choices": ["dog"]}}]}]}  # fmt: skip
    export = tmp_path / "export.json"
    export.write_text(json.dumps([task]))
    assert main(["project", "import", str(tiny_project), str(export)]) == 0
    assert Project(tiny_project).label_map() == {"0.png": "cat", "1.png": "dog"}
    task["annotations"][0]["result"][0]["value"] = {"choices": ["dog\u200b"]}
    export.write_text(json.dumps([task]))
    assert main(["project", "import", str(tiny_project), str(export)]) == 2
    assert "task 1: label 'dog\\u200b' holds invisible character(s) U+200B" in capsys.readouterr().err


def test_classes_with_invisible_characters_are_refused_at_init(tmp_path, capsys):
    images(tmp_path / "img")
    assert (
        main(
            [
                "project",
                "init",
                str(tmp_path / "p"),
                "--pool",
                f"folder:{tmp_path / 'img'}",
                "--classes",
                "cat,dog\u200b",
            ]
        )
        == 2
    )
    assert "--classes: class name 'dog\\u200b' holds invisible character(s) U+200B" in capsys.readouterr().err


def bad_name(folder) -> str:
    name = os.fsdecode(b"caf\xe9.png")  # latin-1 bytes: not UTF-8
    shutil.copy(folder / "0.png", os.path.join(folder, name))
    return "caf\\xe9.png"


def test_non_utf8_file_names_are_refused_in_one_line_by_pack_and_projects(tiny_project, tmp_path, capsys):
    capsys.readouterr()
    shown = bad_name(tmp_path / "imgs")
    for command in (
        ["pack", f"folder:{tmp_path / 'imgs'}", str(tmp_path / "pool")],
        ["project", "next", str(tiny_project), "--k", "2"],  # the file arrived after init
        ["project", "init", str(tmp_path / "p2"), "--pool", f"folder:{tmp_path / 'imgs'}", "--classes", "a,b"],
        ["run", "--dataset", f"folder:{tmp_path / 'imgs'}", "--out", str(tmp_path / "run")],
    ):
        assert main(command) == 2, command
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{tmp_path / 'imgs'}/{shown} is not UTF-8: rename it" in err, err
    assert not (tiny_project / "batches").exists()
