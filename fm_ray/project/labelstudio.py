"""Label Studio, as people use it: the labeling config fm_ray writes, and reading a JSON export.

fm_ray writes `label_config.xml` with one single-choice `<Choices name="label">` control. An export
may still come from another config (Label Studio's own "Image classification" template names its
control `choice`), so the class comes from *the one single-choice control the results use*, whatever
its name; `label` (any case) wins when several are used, and several others are refused in one line
naming them. Every result that gives no label is named with the reason (another control, a
cancelled annotation, a malformed `annotations` or `result`), never dropped without a word.

The export's shape (Label Studio 1.x, `GET /api/projects/<id>/export?exportType=JSON`):

    [{"id": 1, "data": {"id": "<fm_ray id>", "image": "..."}, "annotations": [{"id": 7,
      "was_cancelled": false, "result": [{"from_name": "choice", "to_name": "image", "type": "choices",
      "value": {"choices": ["cat"]}}], ...}], "predictions": [...], ...}]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from fm_ray._internal.log import log
from fm_ray.errors import UserError

CONTROL = "label"  # fm_ray's <Choices name="label" toName="image"> (label_config.xml, tasks' predictions)


def label_config(classes: list[str]) -> str:
    """The Label Studio labeling config for a project's classes: one single-choice control, `label`."""
    choices = "\n".join(f"    <Choice value={quoteattr(c)}/>" for c in classes)
    return (
        "<View>\n"
        '  <Image name="image" value="$image"/>\n'
        f'  <Choices name="{CONTROL}" toName="image" choice="single" showInline="true">\n'
        f"{choices}\n"
        "  </Choices>\n"
        "</View>\n"
    )


@dataclass(frozen=True)
class Result:
    task: int  # 1-based position in the export
    id: str  # the task's data.id
    where: str  # "<file> task N (id X) annotation A result R"
    control: str  # from_name
    kind: str  # type: choices, textarea, rectanglelabels, ...
    value: Any


def read_export(text: str, path: Path) -> list[tuple[str, str, str]]:
    """(id, class, where) per labeled task of a Label Studio JSON export; skipped results are logged."""
    try:
        tasks = json.loads(text)
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e}): export it again from Label Studio as JSON") from None
    except RecursionError:
        raise UserError(f"{path} is nested too deeply to be a Label Studio export: export it again as JSON") from None
    if isinstance(tasks, dict):
        tasks = [tasks]
    if not isinstance(tasks, list):
        raise UserError(f"{path} is JSON but not a list of tasks: export the project again as JSON")
    results, skipped = _results(tasks, path)
    control = label_control(results, path)
    choices: dict[int, list[str]] = {}  # task -> the classes its annotations give
    for r in results:
        if r.control != control:
            why = "no single-choice control is used" if control is None else f"the label control is {control!r}"
            skipped.append(f"{r.where}: control {r.control!r} ({r.kind}) is not the label control ({why})")
        elif not _choices(r):
            skipped.append(f"{r.where}: no class chosen in {r.control!r}")
        else:
            choices.setdefault(r.task, []).extend(_choices(r))
    for line in skipped:
        log(f"skipped {line}")
    out = []
    for r in results:
        given = choices.pop(r.task, None)
        if not given:
            continue
        if len(set(given)) > 1:
            raise UserError(
                f"{path} task {r.task} (id {r.id}): annotations disagree ({sorted(set(given))}): resolve in Label Studio"
            )
        out.append((r.id, given[0], f"{path} task {r.task}"))
    return out


def _results(tasks: list[Any], path: Path) -> tuple[list[Result], list[str]]:
    """Every result of every annotation that is not cancelled, and why the others give none."""
    results: list[Result] = []
    skipped: list[str] = []
    for n, task in enumerate(tasks, start=1):
        data = task.get("data") if isinstance(task, dict) else None
        if not isinstance(data, dict) or not str(data.get("id", "")).strip():
            raise UserError(
                f"{path} task {n}: no data.id (fm_ray's sample id): import tasks made by `fm-ray project next`"
            )
        sid = str(data["id"])
        where = f"{path} task {n} (id {sid})"
        annotations = task.get("annotations")
        if annotations is None:
            continue  # not annotated yet
        if not isinstance(annotations, list):
            skipped.append(f"{where}: 'annotations' is a {type(annotations).__name__}, not a list (malformed)")
            continue
        for a, ann in enumerate(annotations, start=1):
            at = f"{where} annotation {a}"
            if not isinstance(ann, dict):
                skipped.append(f"{at}: a {type(ann).__name__}, not an annotation object (malformed)")
                continue
            if ann.get("was_cancelled"):
                skipped.append(f"{at}: cancelled (skipped) in Label Studio")
                continue
            result = ann.get("result")
            if result is None:
                continue
            if not isinstance(result, list):
                skipped.append(f"{at}: 'result' is a {type(result).__name__}, not a list (malformed)")
                continue
            for k, res in enumerate(result, start=1):
                rt = f"{at} result {k}"
                if not isinstance(res, dict) or not isinstance(res.get("from_name"), str):
                    skipped.append(f"{rt}: no from_name, not a Label Studio result (malformed)")
                    continue
                results.append(Result(n, sid, rt, res["from_name"], str(res.get("type", "choices")), res.get("value")))
    return results, skipped


def _n_choices(r: Result) -> int | None:
    choices = r.value.get("choices") if isinstance(r.value, dict) else None
    return len(choices) if isinstance(choices, list) else None


def label_control(results: list[Result], path: Path) -> str | None:
    """The control whose results give the class: the one single-choice `choices` control used
    (whatever its name), `label` in any case among several; several others are one UserError."""
    used: dict[str, list[Result]] = {}
    for r in results:
        if r.kind == "choices":
            used.setdefault(r.control, []).append(r)
    own = [c for c in used if c.casefold() == CONTROL]
    single = [c for c, rs in used.items() if all((_n_choices(r) or 0) <= 1 for r in rs)]
    candidates = own if len(own) == 1 else single
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    raise UserError(
        f"{path}: the results use {len(candidates)} single-choice controls ({', '.join(map(repr, sorted(candidates)))}) "
        f"and fm_ray cannot tell which gives the class: name that one {CONTROL!r} in the labeling config "
        "(fm_ray's label_config.xml does) or export a project with one <Choices> control"
    )


def _choices(r: Result) -> list[str]:
    """The class one result of the label control gives: `{"choices": ["<class>"]}`, one of them."""
    choices = r.value.get("choices") if isinstance(r.value, dict) else None
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise UserError(
            f"{r.where}: the {r.control!r} result's value is {r.value!r}, not Label Studio's "
            '{"choices": ["<class>"]}: export the project again as JSON'
        )
    if len(choices) > 1:
        raise UserError(
            f"{r.where}: one annotation gives {len(choices)} classes {choices}: "
            f'use single choice (choice="single") in the {r.control!r} control'
        )
    return choices
