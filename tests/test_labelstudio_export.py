"""Label Studio exports as people make them (issue 21, family 1): the stock "Image classification"
template's `choice` control, names in another case, several controls, cancelled and malformed
annotations. Exports are built as Label Studio 1.x writes them (`GET .../export?exportType=JSON`)."""

import json
import xml.etree.ElementTree as ET

import pytest

from fm_ray.cli import main
from fm_ray.project.project import Project


def ls_result(control, value, kind="choices", to="image"):
    return {"value": value, "id": "r" + control, "from_name": control, "to_name": to, "type": kind, "origin": "manual"}


def ls_annotation(results, cancelled=False, n=1):
    return {
        "id": n,
        "completed_by": 1,
        "result": results,
        "was_cancelled": cancelled,
        "ground_truth": False,
        "created_at": "2026-11-25T10:00:00.000000Z",
        "updated_at": "2026-11-25T10:00:00.000000Z",
        "draft_created_at": None,
        "lead_time": 2.5,
        "prediction": {},
        "result_count": 0,
        "unique_id": "u",
        "import_id": None,
        "last_action": None,
        "bulk_created": False,
        "task": 1,
        "project": 1,
        "updated_by": 1,
        "parent_prediction": None,
        "parent_annotation": None,
        "last_created_by": None,
    }


def ls_task(n, sid, annotations):
    return {
        "id": n,
        "annotations": annotations,
        "file_upload": None,
        "drafts": [],
        "predictions": [],
        "data": {"id": sid, "image": f"/data/local-files/?d=imgs/{sid}", "rank": n - 1},
        "meta": {},
        "created_at": "2026-11-25T09:00:00.000000Z",
        "updated_at": "2026-11-25T10:00:00.000000Z",
        "inner_id": n,
        "total_annotations": len(annotations),
        "cancelled_annotations": sum(bool(a.get("was_cancelled")) for a in annotations if isinstance(a, dict)),
        "total_predictions": 0,
        "comment_count": 0,
        "unresolved_comment_count": 0,
        "last_comment_updated_at": None,
        "project": 1,
        "updated_by": 1,
        "comment_authors": [],
    }


def write_export(tmp_path, tasks):
    path = tmp_path / "export.json"
    path.write_text(json.dumps(tasks, indent=2))
    return str(path)


def one_per_task(control, n=10, classes=("cat", "dog")):
    return [
        ls_task(i + 1, f"{i}.png", [ls_annotation([ls_result(control, {"choices": [classes[i % 2]]})])])
        for i in range(n)
    ]


@pytest.mark.parametrize("control", ["choice", "Label", "LABEL", "class"])
def test_the_one_single_choice_control_is_read_whatever_its_name(control, tiny_project, tmp_path, capsys):
    """The issue's example: Label Studio's own template names its control `choice`; 10 annotations
    imported 0 labels with exit 0. Any name, any case, counts when it is the one such control."""
    assert main(["project", "import", str(tiny_project), write_export(tmp_path, one_per_task(control))]) == 0
    assert "10 new label(s)" in capsys.readouterr().out
    assert Project(tiny_project).label_map() == {f"{i}.png": ("cat", "dog")[i % 2] for i in range(10)}


def test_other_controls_are_named_as_skipped_not_dropped(tiny_project, tmp_path, capsys):
    tasks = one_per_task("choice", n=3)
    tasks[0]["annotations"][0]["result"].append(ls_result("notes", {"text": ["blurry"]}, "textarea"))
    tasks[1]["annotations"][0]["result"].append(ls_result("box", {"rectanglelabels": ["cat"]}, "rectanglelabels"))
    tasks[2]["annotations"][0]["result"].append(ls_result("tags", {"choices": ["sunny", "indoor"]}))  # multiple
    assert main(["project", "import", str(tiny_project), write_export(tmp_path, tasks)]) == 0
    out = capsys.readouterr().out
    assert "3 new label(s)" in out
    for task, control in [(1, "notes"), (2, "box"), (3, "tags")]:
        assert f"skipped {tmp_path / 'export.json'} task {task} (id {task - 1}.png) annotation 1 result 2: " \
               f"control {control!r}" in out and "the label control is 'choice'" in out  # fmt: skip


@pytest.mark.parametrize(
    "controls",
    [("choice", "quality"), ("class", "species", "mood")],
)
def test_several_single_choice_controls_are_refused_naming_them(controls, tiny_project, tmp_path, capsys):
    tasks = one_per_task(controls[0], n=4)
    for t, control in zip(tasks[1:], controls[1:], strict=False):
        t["annotations"][0]["result"].append(ls_result(control, {"choices": ["x"]}))
    before = (tiny_project / "labels.csv").read_bytes()
    assert main(["project", "import", str(tiny_project), write_export(tmp_path, tasks)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"the results use {len(controls)} single-choice controls" in err
    assert all(repr(c) in err for c in controls)
    assert (tiny_project / "labels.csv").read_bytes() == before


def test_fm_rays_own_control_wins_over_another_single_choice_control(tiny_project, tmp_path, capsys):
    tasks = one_per_task("label", n=2)
    tasks[0]["annotations"][0]["result"].append(ls_result("quality", {"choices": ["good"]}))
    assert main(["project", "import", str(tiny_project), write_export(tmp_path, tasks)]) == 0
    out = capsys.readouterr().out
    assert "2 new label(s)" in out and "control 'quality' (choices) is not the label control" in out


def test_cancelled_and_malformed_annotations_are_named_with_the_reason(tiny_project, tmp_path, capsys):
    tasks = one_per_task("choice", n=7)
    tasks[0]["annotations"][0]["was_cancelled"] = True  # skipped in Label Studio
    tasks[1]["annotations"] = {"result": []}  # not a list
    tasks[2]["annotations"] = ["oops"]  # an annotation that is not an object
    tasks[3]["annotations"][0]["result"] = "cat"  # result not a list
    tasks[4]["annotations"][0]["result"] = [{"value": {"choices": ["cat"]}}]  # no from_name
    tasks[5]["annotations"][0]["result"][0]["value"] = {"choices": []}  # nothing chosen
    assert main(["project", "import", str(tiny_project), write_export(tmp_path, tasks)]) == 0
    out = capsys.readouterr().out
    assert "1 new label(s)" in out  # task 7 only
    export = tmp_path / "export.json"
    for line in [
        "task 1 (id 0.png) annotation 1: cancelled",
        "task 2 (id 1.png): 'annotations' is a dict, not a list (malformed)",
        "task 3 (id 2.png) annotation 1: a str, not an annotation object (malformed)",
        "task 4 (id 3.png) annotation 1: 'result' is a str, not a list (malformed)",
        "task 5 (id 4.png) annotation 1 result 1: no from_name",
        "task 6 (id 5.png) annotation 1 result 1: no class chosen in 'choice'",
    ]:
        assert f"skipped {export} {line}" in out, line
    assert Project(tiny_project).label_map() == {"6.png": "cat"}


def test_init_writes_label_studios_config_with_fm_rays_control(tiny_project):
    root = ET.fromstring((tiny_project / "label_config.xml").read_text())
    (choices,) = root.iter("Choices")
    assert choices.get("name") == "label" and choices.get("choice") == "single" and choices.get("toName") == "image"
    assert [c.get("value") for c in choices.iter("Choice")] == ["cat", "dog"]
    assert [i.get("name") for i in root.iter("Image")] == ["image"]
