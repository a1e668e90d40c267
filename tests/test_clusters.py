"""clusters/: the launcher configs pass Ray's own config validation, the KubeRay manifests carry what
KubeRay needs, every `fm-ray` command in them parses, and a job goes through the Ray Jobs API on a
local two-node Ray cluster."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
LAUNCHER = {"aws-gpu.yaml": "aws", "gcp-gpu.yaml": "gcp", "onprem.yaml": "local"}
CLOUD = ["aws-gpu.yaml", "gcp-gpu.yaml"]
KUBERAY = {"kuberay-raycluster.yaml": "RayCluster", "kuberay-rayjob.yaml": "RayJob"}
PAPER_GRID_RUNS = 2 * 3 * 7 * 3  # datasets x regimes x strategies x seeds

# What test_job_submit_on_local_multinode_cluster submits: a tiny real sweep that joins the cluster.
TINY_SWEEP = (
    "fm-ray sweep --ray-address auto --strategies random,entropy --seeds 0 --dataset fashion_mnist "
    "--class-counts 0:60,1:300,2:60 --model cnn --init 20 --batch 10 --rounds 1 --epochs 1 --device cpu "
    "--backend local --max-concurrent 2 --out {out}"
)


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTERS / name).read_text())


def prepared(name: str) -> dict[str, Any]:
    """The config as `ray up` sees it before touching a cloud: defaults filled in, setup commands merged."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(load(name))


# --------------------------------------------------------------------------------------------
# Cluster launcher configs


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_config_passes_rays_own_validation(name):
    from ray.autoscaler._private.util import validate_config

    raw = load(name)
    assert raw["provider"]["type"] == LAUNCHER[name]
    validate_config(prepared(name))  # jsonschema against ray/autoscaler/ray-schema.json + Ray's own checks


def test_rays_validation_rejects_what_ray_up_would_reject():
    """The validator is live: a misspelled key and a fractional resource count both fail."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    typo = load("aws-gpu.yaml")
    typo["idle_timeout_minute"] = typo.pop("idle_timeout_minutes")
    with pytest.raises(jsonschema.ValidationError, match="idle_timeout_minute"):
        validate_config(prepare_config(typo))
    fractional = load("aws-gpu.yaml")
    fractional["available_node_types"]["ray.worker.gpu1"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(fractional))


@pytest.mark.parametrize("name", CLOUD)
def test_cloud_config_has_an_autoscaling_gpu_worker_group(name):
    raw = load(name)
    assert 5 <= raw["idle_timeout_minutes"] <= 60
    types = raw["available_node_types"]
    assert raw["head_node_type"] in types
    gpu = {k: t for k, t in types.items() if k != raw["head_node_type"] and t["resources"].get("GPU", 0) >= 1}
    assert gpu, f"{name}: no worker type with GPU resources"
    assert any(t["min_workers"] >= 1 and t["max_workers"] > t["min_workers"] for t in gpu.values())
    assert sum(t.get("max_workers", 0) for t in gpu.values()) <= raw["max_workers"]
    if raw["provider"]["type"] == "aws":
        assert raw["provider"]["cache_stopped_nodes"] is False  # idle GPU nodes terminate, not stop
        assert all(t["node_config"]["ImageId"] for t in types.values())
    if raw["provider"]["type"] == "gcp":
        for key, t in gpu.items():  # GCE refuses GPU VMs that would live-migrate
            assert t["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE", key


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_every_node_installs_fm_ray_and_fetches_the_datasets(name):
    cfg = prepared(name)  # setup_commands merged into head_setup_commands and worker_setup_commands
    for role in ("head_setup_commands", "worker_setup_commands"):
        cmds = cfg[role]
        installs = [i for i, c in enumerate(cmds) if re.search(r"pip install\b.*\bfm_ray", c)]
        data_env = [i for i, c in enumerate(cmds) if re.search(r"export FM_RAY_DATA=", c)]
        fetches = [i for i, c in enumerate(cmds) if "CIFAR10(" in c and "FashionMNIST(" in c and "download=True" in c]
        assert installs and data_env and fetches, f"{name} {role}: {cmds}"
        assert all("FM_RAY_DATA" in cmds[i] for i in fetches)
        assert data_env[0] < fetches[0] and installs[0] < fetches[0]  # torchvision comes with fm_ray
    for remote, local in cfg["file_mounts"].items():  # relative to the repo root, where `ray up` runs
        assert not Path(local).is_absolute() and (ROOT / local).resolve().is_relative_to(ROOT), (remote, local)


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_commands_are_valid_bash(name):
    raw = load(name)
    cmds = [c for key, v in raw.items() if key.endswith("_commands") for c in v]
    cmds += [c for t in raw.get("available_node_types", {}).values() for c in t.get("initialization_commands", [])]
    for cmd in cmds:
        check = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert check.returncode == 0, f"{name}: {cmd!r}: {check.stderr}"


def test_one_ray_version_everywhere():
    """Laptop, launcher nodes, KubeRay image and rayVersion must agree; the Jobs API and `ray up` expect it."""
    found: dict[str, str] = {}
    for name in LAUNCHER:
        for cmd in load(name)["setup_commands"]:
            for v in re.findall(r"ray\[[a-z,]+\]==([\w.]+)", cmd):
                found[name] = v
    for name, kind in KUBERAY.items():
        spec = kuberay_cluster_spec(name, kind)
        found[f"{name} rayVersion"] = str(spec["rayVersion"])
        for i, container in enumerate(containers(spec)):
            found[f"{name} image {i}"] = re.search(r"ray([\d.]+\d)", container["image"]).group(1)
    found["Dockerfile"] = re.search(r"FROM rayproject/ray:([\d.]+\d)", (CLUSTERS / "Dockerfile").read_text()).group(1)
    assert set(LAUNCHER) <= set(found)
    assert len(set(found.values())) == 1, found
    minimum = re.search(r'"ray\[[a-z,]+\]>=([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    version = next(iter(found.values()))
    assert tuple(map(int, version.split("."))) >= tuple(map(int, minimum.split(".")))


# --------------------------------------------------------------------------------------------
# KubeRay manifests


def kuberay_doc(name: str, kind: str) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((CLUSTERS / name).read_text()) if d]
    matching = [d for d in docs if d.get("kind") == kind]
    assert len(matching) == 1, f"{name}: want one {kind}, found kinds {[d.get('kind') for d in docs]}"
    return matching[0]


def kuberay_cluster_spec(name: str, kind: str) -> dict[str, Any]:
    doc = kuberay_doc(name, kind)
    return doc["spec"]["rayClusterSpec"] if kind == "RayJob" else doc["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def gpu_groups(spec: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [
        (g, c)
        for g in spec["workerGroupSpecs"]
        for c in g["template"]["spec"]["containers"]
        if int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) >= 1
    ]


@pytest.mark.parametrize("name", sorted(KUBERAY))
def test_kuberay_manifest_has_the_fields_kuberay_requires(name):
    kind = KUBERAY[name]
    doc = kuberay_doc(name, kind)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["metadata"]["name"]
    spec = kuberay_cluster_spec(name, kind)
    assert spec["rayVersion"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for g in groups:
        params = g["rayStartParams"]  # required by the CRD (may be empty); values are strings
        assert isinstance(params, dict) and all(isinstance(v, str) for v in params.values()), params
        assert g["template"]["spec"]["containers"]
    for c in containers(spec):
        assert c["name"] and c["image"] and c["resources"]["limits"]
        assert {"name": "FM_RAY_DATA", "value": "/data"} in c.get("env", [])
    for g in spec["workerGroupSpecs"]:
        assert g["groupName"]
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    gpus = gpu_groups(spec)
    assert gpus, f"{name}: no worker group with nvidia.com/gpu in its limits"
    for _, c in gpus:  # Kubernetes extended resources: requests, if given, must equal limits
        requests = c["resources"].get("requests", {})
        assert str(requests.get("nvidia.com/gpu", c["resources"]["limits"]["nvidia.com/gpu"])) == str(
            c["resources"]["limits"]["nvidia.com/gpu"]
        )
    assert any(g["maxReplicas"] > g["minReplicas"] for g, _ in gpus) and spec["enableInTreeAutoscaling"]


def parse_fm_ray(command: str) -> Any:
    """Parse `fm-ray ...` with fm-ray's own parser; a sweep is also expanded into its grid of runs."""
    from fm_ray.cli import build_parser

    argv = shlex.split(command, comments=True)
    assert argv[0] == "fm-ray", command
    args = build_parser().parse_args(argv[1:])
    if args.command == "sweep":
        from fm_ray.grid import sweep_from_args

        return args, *sweep_from_args(args)
    return args, None, None


def test_rayjob_runs_the_paper_grid_with_trials_that_fit_its_gpu_pods():
    doc = kuberay_doc("kuberay-rayjob.yaml", "RayJob")
    entrypoint = doc["spec"]["entrypoint"]
    assert entrypoint.startswith("fm-ray sweep")
    _, configs, opts = parse_fm_ray(entrypoint)
    assert len(configs) == PAPER_GRID_RUNS
    assert opts.gpus_per_trial >= 1
    if doc["spec"].get("shutdownAfterJobFinishes"):  # the cluster goes away: results must not live on it
        assert re.match(r"(s3|gs)://", opts.out), opts.out
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    assert isinstance(env, dict) and env["env_vars"]["FM_RAY_DATA"] == "/data"
    _, pod = gpu_groups(doc["spec"]["rayClusterSpec"])[0]
    limits = pod["resources"]["limits"]
    assert opts.gpus_per_trial <= int(limits["nvidia.com/gpu"])
    assert opts.cpus_per_trial <= float(limits["cpu"])


def readme_commands() -> list[str]:
    text = (CLUSTERS / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    found = (re.search(r"(?:^|\s)(fm-ray (?:run|sweep|report|strategies)\b.*)", line) for line in lines)
    return [m.group(1) for m in found if m]


def test_readme_fm_ray_commands_parse_and_fit_the_launcher_gpu_nodes():
    commands = readme_commands()
    assert any(c.startswith("fm-ray sweep") for c in commands) and any(c.startswith("fm-ray report") for c in commands)
    smallest_gpu_node_cpus = min(
        t["resources"]["CPU"]
        for name in CLOUD
        for t in load(name)["available_node_types"].values()
        if t["resources"].get("GPU", 0) >= 1
    )
    for command in commands:
        _, configs, opts = parse_fm_ray(command)
        if opts is not None:
            assert configs, command
            assert opts.cpus_per_trial <= smallest_gpu_node_cpus and opts.gpus_per_trial == 1, command
    assert any(configs is not None and len(configs) == PAPER_GRID_RUNS for _, configs, _ in map(parse_fm_ray, commands))


# --------------------------------------------------------------------------------------------
# A real job through the Ray Jobs API on a local multi-node cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
def test_job_submit_on_local_multinode_cluster(monkeypatch):
    """Head + second node; a tiny `fm-ray sweep` submitted through the Jobs API runs to completion and its
    Parquet rows can be read back."""
    from ray.cluster_utils import Cluster
    from ray.job_submission import JobStatus, JobSubmissionClient

    # A private Ray temp dir: other Ray instances on this machine must neither see this cluster as
    # "the current one" (ray_current_cluster) nor clash with it. Kept short: Ray's socket paths live there.
    tmp = tempfile.mkdtemp(prefix="fmrj", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", tmp)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # `python` / `fm-ray` in the entrypoint resolve to this interpreter's environment.
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    dashboard_port = _free_port()
    cluster = None
    try:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 1,
                "gcs_server_port": _free_port(),
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": dashboard_port,
                "dashboard_agent_listen_port": _free_port(),
                "temp_dir": os.path.join(tmp, "ray"),
            },
        )
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        assert len(cluster.list_all_nodes()) == 2

        client = JobSubmissionClient(f"http://127.0.0.1:{dashboard_port}")
        out = os.path.join(tmp, "sweep")
        entrypoint = TINY_SWEEP.format(out=out)
        env = {k: os.environ[k] for k in ("FM_RAY_DATA", "FM_RAY_CACHE", "FM_RAY_OFFLINE")}
        # No working_dir here (fm_ray is installed in this venv): both simulated nodes share one
        # runtime_resources folder, and the second node's cleanup would delete the driver's cwd.
        job = client.submit_job(entrypoint=entrypoint, runtime_env={"env_vars": env})
        deadline = time.monotonic() + 240
        status = client.get_job_status(job)
        while not JobStatus(status).is_terminal() and time.monotonic() < deadline:
            time.sleep(1)
            status = client.get_job_status(job)
        logs = client.get_job_logs(job)
        assert status == JobStatus.SUCCEEDED, f"{status}\n{logs}"
        listed = [j for j in client.list_jobs() if j.submission_id == job]
        assert listed and listed[0].entrypoint == entrypoint
        from fm_ray.report import load_rounds

        rounds = load_rounds(out)
        assert len(rounds) == 4  # 2 strategies x (round 0 + 1 query round)
        assert sorted(set(rounds["strategy"])) == ["entropy", "random"]
        assert rounds["accuracy"].between(0, 1).all()
    finally:
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def test_paper_grid_size_matches_the_sweep_preset_lists():
    """The README's and the RayJob's 126 = 2 x 3 x 7 x 3 is the grid fm_ray's own presets define."""
    from fm_ray.config import PRESETS
    from fm_ray.grid import PAPER_STRATEGIES

    assert 2 * len(PRESETS) * len(PAPER_STRATEGIES) * 3 == PAPER_GRID_RUNS
