"""A real Label Studio server on localhost: import a batch's tasks.json, annotate through its API as a
scripted annotator, export, and bring the export back with `fm-ray project import`.

Needs Label Studio in its own environment (it pins its own Django stack): `make test-labelstudio`
installs it into .lsvenv and sets FM_RAY_LABEL_STUDIO to its `label-studio` executable; CI runs that.
Without FM_RAY_LABEL_STUDIO the test is skipped.
"""

import csv
import json
import os
import secrets
import socket
import subprocess
import time
import urllib.request

import pytest

from fm_ray.cli import main
from fm_ray.project.project import Project

pytestmark = [pytest.mark.labelstudio, pytest.mark.slow]
CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


class LabelStudio:
    def __init__(self, url: str, token: str):
        self.url, self.token = url, token

    def call(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Token {self.token}", "Content-Type": "application/json"}
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=120) as r:
            text = r.read()
        return json.loads(text) if text else None


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    exe = os.environ.get("FM_RAY_LABEL_STUDIO")
    if not exe:
        pytest.skip("FM_RAY_LABEL_STUDIO is not set: run `make test-labelstudio`")
    assert os.path.exists(exe), f"FM_RAY_LABEL_STUDIO={exe} does not exist"
    with socket.socket() as s:  # a free port on loopback
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(20)
    env = dict(os.environ, LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true")
    env["LABEL_STUDIO_BASE_DATA_DIR"] = str(tmp_path_factory.mktemp("ls-data"))
    log = open(tmp_path_factory.mktemp("ls-log") / "server.log", "w")  # noqa: SIM115 (lives as long as the server)
    proc = subprocess.Popen(
        [exe, "start", "--no-browser", "--host", "127.0.0.1", "--port", str(port)]
        + ["--username", "annotator@example.com", "--password", secrets.token_hex(8), "--user-token", token],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # ~90 s on 2 idle cores
        while True:
            assert proc.poll() is None, f"Label Studio exited early (see {log.name})"
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if json.loads(r.read()).get("status") == "UP":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "Label Studio did not come up in 10 minutes"
            time.sleep(3)
        yield LabelStudio(url, token)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def ids_of(batch_csv):
    with open(batch_csv) as f:
        return [r["id"] for r in csv.DictReader(f)]


def test_labeling_workflow_through_label_studio(label_studio, fmnist, tmp_path, capsys):
    from PIL import Image

    root, truth = tmp_path / "unlabeled", {}
    for i in range(900):  # 900 real FashionMNIST images as an unlabeled folder
        (root / f"part{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(fmnist.train_x[i, 0].numpy()).save(root / f"part{i % 3}" / f"{i:04d}.png")
        truth[f"part{i % 3}/{i:04d}.png"] = CLASSES[int(fmnist.train_y[i])]
    proj = tmp_path / "proj"
    flags = ["--model", "cnn", "--strategy", "fishermask", "--epochs", "2", "--fisher-samples", "256"]
    flags += ["--backend", "local", "--device", "cpu", "--seed", "7"]
    assert main(["project", "init", str(proj), "--pool", f"folder:{root}", "--classes", ",".join(CLASSES), *flags]) == 0

    # batch 0 (seeded random) labeled in a spreadsheet
    assert main(["project", "next", str(proj), "--k", "40"]) == 0
    first = ids_of(proj / "batches/0/batch.csv")
    sheet = tmp_path / "sheet.csv"
    sheet.write_text("id,label\n" + "".join(f"{i},{truth[i]}\n" for i in first))
    assert main(["project", "import", str(proj), str(sheet)]) == 0

    # batch 1 (FisherMask) labeled in Label Studio
    assert main(["project", "next", str(proj), "--k", "40"]) == 0
    second = ids_of(proj / "batches/1/batch.csv")
    assert len(second) == 40 and not set(first) & set(second)
    tasks = json.loads((proj / "batches/1/tasks.json").read_text())
    choices = "".join(f'<Choice value="{c}"/>' for c in CLASSES)
    config = (
        f'<View><Image name="image" value="$image"/><Choices name="label" toName="image">{choices}</Choices></View>'
    )
    ls = label_studio
    project = ls.call("POST", "/api/projects", {"title": "fm_ray batch 1", "label_config": config})
    imported = ls.call("POST", f"/api/projects/{project['id']}/import", tasks)
    assert imported["task_count"] == 40 and imported["prediction_count"] == 40
    for task in ls.call("GET", f"/api/projects/{project['id']}/tasks?page_size=100"):
        answer = {"from_name": "label", "to_name": "image", "type": "choices"}
        answer["value"] = {"choices": [truth[task["data"]["id"]]]}
        ls.call("POST", f"/api/tasks/{task['id']}/annotations", {"result": [answer]})
    export = ls.call("GET", f"/api/projects/{project['id']}/export?exportType=JSON")
    export_path = tmp_path / "export.json"
    export_path.write_text(json.dumps(export))

    capsys.readouterr()
    assert main(["project", "import", str(proj), str(export_path)]) == 0
    assert "40 new label(s)" in capsys.readouterr().out
    assert main(["project", "import", str(proj), str(export_path)]) == 0  # re-import: nothing changes
    assert "0 new label(s)" in capsys.readouterr().out
    labels = {r["id"]: r["label"] for r in Project(proj).labels()}
    assert len(labels) == 80 and all(labels[i] == truth[i] for i in second)
    assert main(["project", "status", str(proj)]) == 0
    assert "labels: 80 (0 sent out and not labeled yet); batches: 2" in capsys.readouterr().out

    # an export that names an unknown id, or an unknown class: exit 2, one line, nothing written
    store = (proj / "labels.csv").read_bytes()
    for field, value, message in (("id", "elsewhere.png", "unknown id"), ("class", "zebra", "unknown class")):
        bad = json.loads(json.dumps(export))
        if field == "id":
            bad[3]["data"]["id"] = value
        else:
            bad[3]["annotations"][0]["result"][0]["value"]["choices"] = [value]
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        assert main(["project", "import", str(proj), str(tmp_path / "bad.json")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "bad.json task 4" in err, err
        assert (proj / "labels.csv").read_bytes() == store
