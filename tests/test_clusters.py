"""clusters/: the launcher configs pass Ray's own config validation, the KubeRay manifests carry what
KubeRay needs, every `fm-ray` command in them parses, and a job goes through the Ray Jobs API on a
local two-node Ray cluster."""

from __future__ import annotations

import json
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
TOKEN_PATH = "~/.ray/auth_token"  # where `ray get-auth-token --generate` writes and every Ray process looks

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
        if remote == TOKEN_PATH:  # the one exception, from the laptop's home: see test_launcher_turns_on_token_auth
            continue
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
        from fm_ray.sweep.grid import sweep_from_args

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


def gpu_node_cpus() -> float:
    """CPUs of the smallest GPU node type in the cloud launcher configs."""
    return min(
        t["resources"]["CPU"]
        for name in CLOUD
        for t in load(name)["available_node_types"].values()
        if t["resources"].get("GPU", 0) >= 1
    )


def test_readme_fm_ray_commands_parse_and_fit_the_launcher_gpu_nodes():
    commands = readme_commands()
    assert any(c.startswith("fm-ray sweep") for c in commands) and any(c.startswith("fm-ray report") for c in commands)
    smallest_gpu_node_cpus = gpu_node_cpus()
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
        # waits on the job's state; the ceiling only stops a hang (a busy 2-core machine is slow)
        deadline = time.monotonic() + 900
        status = client.get_job_status(job)
        while not JobStatus(status).is_terminal() and time.monotonic() < deadline:
            time.sleep(1)
            status = client.get_job_status(job)
        logs = client.get_job_logs(job)
        assert status == JobStatus.SUCCEEDED, f"{status}\n{logs}"
        listed = [j for j in client.list_jobs() if j.submission_id == job]
        assert listed and listed[0].entrypoint == entrypoint
        from fm_ray.sweep.report import load_rounds

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
    from fm_ray.sweep.grid import PAPER_STRATEGIES

    assert 2 * len(PRESETS) * len(PAPER_STRATEGIES) * 3 == PAPER_GRID_RUNS


# --------------------------------------------------------------------------------------------
# Security: who can reach the cluster, what its machines may do, what goes into the image


def ray_start_commands(cfg: dict[str, Any]) -> list[str]:
    return [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in cfg[key] if "ray start" in c]


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_turns_on_token_auth(name):
    """Every `ray start` runs with RAY_AUTH_MODE=token, every node gets the laptop's token, and the
    config still passes Ray's own validation with all of that in it."""
    from ray.autoscaler._private.util import validate_config

    raw, cfg = load(name), prepared(name)
    validate_config(cfg)
    starts = ray_start_commands(raw)
    assert len(starts) == 2, starts  # head and workers
    for cmd in starts:
        assert re.search(r"export RAY_AUTH_MODE=token;\s*ray start", cmd), cmd
    # the token file `ray get-auth-token --generate` wrote on the laptop, synced to the head, which passes it on
    assert raw["file_mounts"][TOKEN_PATH] == TOKEN_PATH
    setup = cfg["head_setup_commands"]
    assert any("export RAY_AUTH_MODE=token" in c and ".bashrc" in c for c in setup)  # `ray status`, job drivers
    assert f"chmod 600 {TOKEN_PATH}" in setup
    assert cfg["worker_setup_commands"] == setup


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_dashboard_listens_on_loopback_only(name):
    """The Jobs API runs code: it is reached through `ray dashboard <cfg>` (an SSH tunnel), never the network."""
    text = (CLUSTERS / name).read_text()
    assert "0.0.0.0" not in text
    head = [c for c in load(name)["head_start_ray_commands"] if "ray start" in c]
    assert len(head) == 1 and re.search(r"--dashboard-host[= ]127\.0\.0\.1\b", head[0]), head


def downloads_are_verified(commands: list[str]) -> list[str]:
    """Problems in shell commands: a download piped into a shell, or a downloaded file not checked by sha256."""
    problems = []
    for cmd in commands:
        if re.search(r"\b(curl|wget)\b[^|;&]*\|\s*(sudo\s+)?(ba|z)?sh\b", cmd):
            problems.append(f"download piped into a shell: {cmd}")
        for out in re.findall(r"\bcurl\b[^;&|]*?-[a-zA-Z]*o\s*(\S+)", cmd):
            if not re.search(rf'"[0-9a-f]{{64}}\s+{re.escape(out)}"\s*\|\s*sha256sum -c', cmd):
                problems.append(f"{out} is not checked against a sha256: {cmd}")
    return problems


def test_download_check_catches_an_unpinned_installer():
    assert downloads_are_verified(["command -v uv || curl -LsSf https://astral.sh/uv/install.sh | sh"])
    assert downloads_are_verified(["curl -LsSfo /tmp/x.whl https://example.org/x.whl && unzip /tmp/x.whl"])
    assert not downloads_are_verified(
        [f'curl -LsSfo /tmp/x https://e.org/x && echo "{"a" * 64}  /tmp/x" | sha256sum -c -']
    )


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_setup_pins_what_it_downloads(name):
    raw = load(name)
    cmds = [c for key, v in raw.items() if key.endswith("_commands") for c in v]
    cmds += [c for t in raw.get("available_node_types", {}).values() for c in t.get("initialization_commands", [])]
    assert downloads_are_verified(cmds) == []
    assert any("sha256sum -c" in c for c in cmds)
    for cmd in cmds:  # Ray itself at the exact version (its wheel comes from PyPI over TLS)
        assert not re.search(r"pip install.*\bray(\[[a-z,]+\])?(\s|$|>)", cmd), cmd


WORKER_ACTIONS = {"s3:ListBucket", "s3:GetBucketLocation", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"}
WORKER_ACTIONS |= {"s3:AbortMultipartUpload"}


def policy_problems(policy: dict[str, Any], allowed_actions: set[str]) -> list[str]:
    """Why an IAM policy is broader than `allowed_actions` on named resources."""
    problems = []
    for st in policy["Statement"]:
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        resources = [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]
        if st["Effect"] != "Allow" or "NotAction" in st or "NotResource" in st:
            problems.append(f"unexpected statement form: {st}")
        problems += [f"wildcard or unlisted action {a}" for a in actions if "*" in a or a not in allowed_actions]
        problems += [f"resource {r} is not one named bucket / role" for r in resources if r == "*" or r.endswith(":*")]
    return problems


def test_policy_check_catches_wildcards():
    broad = {"Statement": [{"Effect": "Allow", "Action": ["s3:*", "ec2:RunInstances"], "Resource": "*"}]}
    assert len(policy_problems(broad, WORKER_ACTIONS)) == 3


def test_aws_workers_may_only_read_and_write_the_results_bucket():
    """Trials run user-visible code on the workers: their instance profile holds S3 on the results
    prefix and no EC2 / IAM action, unlike the head's ray-autoscaler-v1 (EC2 + S3 full access)."""
    raw = load("aws-gpu.yaml")
    workers = {k: t for k, t in raw["available_node_types"].items() if k != raw["head_node_type"]}
    assert workers and all(
        t["node_config"]["IamInstanceProfile"] == {"Name": "fm-ray-worker"} for t in workers.values()
    )
    iam = CLUSTERS / "iam"
    policy = json.loads((iam / "aws-worker-results-policy.json").read_text())
    assert policy_problems(policy, WORKER_ACTIONS) == []
    resources = [
        r
        for st in policy["Statement"]
        for r in ([st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"])
    ]
    assert all(r.startswith("arn:aws:s3:::YOUR_BUCKET") for r in resources)
    assert any(r.endswith("/fm_ray/*") for r in resources)  # objects under the results prefix only
    trust = json.loads((iam / "aws-ec2-trust-policy.json").read_text())
    assert [st["Principal"] for st in trust["Statement"]] == [{"Service": "ec2.amazonaws.com"}]
    passrole = json.loads((iam / "aws-head-passrole-policy.json").read_text())
    assert policy_problems(passrole, {"iam:PassRole"}) == []
    assert passrole["Statement"][0]["Resource"].endswith(":role/fm-ray-worker")


def test_gcp_workers_may_only_use_cloud_storage():
    raw = load("gcp-gpu.yaml")
    workers = {k: t for k, t in raw["available_node_types"].items() if k != raw["head_node_type"]}
    for key, t in workers.items():
        (account,) = t["node_config"]["serviceAccounts"]
        assert account["email"].startswith("fm-ray-worker@"), key  # not the autoscaler's (compute.admin)
        assert account["scopes"] == ["https://www.googleapis.com/auth/devstorage.read_write"], key


def pod_templates(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [g["template"] for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]]


@pytest.mark.parametrize("name", sorted(KUBERAY))
def test_kuberay_token_auth_and_non_root_pods(name):
    spec = kuberay_cluster_spec(name, KUBERAY[name])
    assert spec["authOptions"] == {"mode": "token"}  # KubeRay >= 1.5.1 makes the Secret and sets RAY_AUTH_*
    assert tuple(map(int, spec["rayVersion"].split("."))) >= (2, 52)  # token auth exists from Ray 2.52
    for tpl in pod_templates(spec):
        pod = tpl["spec"]["securityContext"]
        assert (
            pod["runAsNonRoot"] is True and pod["runAsUser"] != 0 and pod["seccompProfile"]["type"] == "RuntimeDefault"
        )
        for c in tpl["spec"]["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], c["name"]
            assert sc.get("privileged") is not True and sc.get("runAsUser", 1) != 0
    auto = spec["autoscalerOptions"]["securityContext"]
    assert auto["allowPrivilegeEscalation"] is False and auto["capabilities"]["drop"] == ["ALL"]
    for g in spec["workerGroupSpecs"]:  # trials need no Kubernetes API token
        assert g["template"]["spec"]["automountServiceAccountToken"] is False


def network_policy(name: str) -> dict[str, Any]:
    return kuberay_doc(name, "NetworkPolicy")


@pytest.mark.parametrize("name", sorted(KUBERAY))
def test_kuberay_network_policy_admits_only_the_cluster_and_its_controllers(name):
    """Every Ray pod is selected; ingress comes from the same cluster's pods, or to the Jobs API port
    only. The dashboard leaves loopback only where the operator must poll it (RayJob)."""
    spec = kuberay_cluster_spec(name, KUBERAY[name])
    policy = network_policy(name)["spec"]
    selector = policy["podSelector"]["matchLabels"]
    assert selector and "Ingress" in policy["policyTypes"]
    for tpl in pod_templates(spec):
        assert selector.items() <= tpl["metadata"]["labels"].items()
    open_ports: set[int] = set()
    for rule in policy["ingress"]:
        sources = rule["from"]  # a rule without `from` admits everyone
        assert sources and not any("ipBlock" in s for s in sources), rule
        if sources == [{"podSelector": {"matchLabels": selector}}]:
            assert "ports" not in rule  # Ray's own pods talk on many ports
        else:
            ports = {p["port"] for p in rule["ports"]}
            assert ports == {8265}, rule
            open_ports |= ports
    host = spec["headGroupSpec"]["rayStartParams"]["dashboard-host"]
    if KUBERAY[name] == "RayCluster":
        assert host == "127.0.0.1" and not open_ports  # reached through `kubectl port-forward` only
    else:  # RayJob: the operator and the submitter pod call the Jobs API over the head Service
        assert host == "0.0.0.0" and open_ports == {8265}


def dockerfile_from(text: str) -> tuple[str, dict[str, str | None]]:
    """The FROM image reference and the ARGs declared before it (name -> default or None)."""
    args: dict[str, str | None] = {}
    for line in text.splitlines():
        if m := re.match(r"ARG\s+(\w+)(?:=(\S+))?\s*$", line):
            args[m.group(1)] = m.group(2)
        if m := re.match(r"FROM\s+(\S+)", line):
            return m.group(1), args
    raise AssertionError("no FROM")


def test_dockerfile_base_image_is_pinned_by_digest_and_runs_as_non_root():
    text = (CLUSTERS / "Dockerfile").read_text()
    image, args = dockerfile_from(text)
    digest = re.fullmatch(r"rayproject/ray:[\w.-]+@sha256:(\$\{(\w+)\}|[0-9a-f]{64})", image)
    assert digest, image
    if digest.group(2):  # a digest build arg: it must have no default, so a tag-only build cannot happen
        assert digest.group(2) in args and args[digest.group(2)] is None
        assert f"--build-arg {digest.group(2)}=" in text  # and the header says how to pass it
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1] not in ("root", "0", "0:0")
    assert downloads_are_verified([line for line in text.splitlines() if line.startswith("RUN")]) == []


def dockerignored(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    from fnmatch import fnmatch

    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated, pat = pattern.startswith("!"), pattern.lstrip("!").rstrip("/")
        forms = {pat, pat[3:]} if pat.startswith("**/") else {pat}
        if any(fnmatch(c, f) for c in candidates for f in forms):
            ignored = not negated
    return ignored


def test_dockerignore_keeps_secrets_data_and_results_out_of_the_image():
    lines = (CLUSTERS / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"  # an allowlist: whatever a checkout holds stays out unless let in
    assert {p for p in patterns if p.startswith("!")} == {"!pyproject.toml", "!README.md", "!fm_ray"}
    kept_out = [
        ".env",
        ".ray/auth_token",
        ".aws/credentials",
        "id_rsa",
        "key.pem",
        ".git/config",
        ".venv/bin/python",
        "runs/demo/rounds.parquet",
        "sweeps/a/results",
        "data/cifar-10-batches-py/data_batch_1",
        ".cache/fm_ray/x",
        "fm_ray/.env",
        "fm_ray/auth_token",
        "fm_ray/__pycache__/loop.cpython-311.pyc",
        "fm_ray/checkpoint.pt",
    ]
    for path in kept_out:
        assert dockerignored(patterns, path), path
    for path in ["pyproject.toml", "README.md", "fm_ray/run/recipe.py", "fm_ray/core/fisher.py"]:
        assert not dockerignored(patterns, path), path
    copied = re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)\s+\S+$", (CLUSTERS / "Dockerfile").read_text(), flags=re.M)
    assert copied and all(not dockerignored(patterns, src) for srcs in copied for src in srcs.split())


# --------------------------------------------------------------------------------------------
# torch.load unpickles arbitrary objects unless weights_only=True (torch < 2.6 defaulted to False)


def unsafe_loads(source: str) -> list[str]:
    """Calls in `source` that can unpickle arbitrary objects."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
        kw = {k.arg: k.value for k in node.keywords}
        if owner == "torch" and node.func.attr == "load":
            safe = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
            if not safe:
                found.append(f"line {node.lineno}: torch.load without weights_only=True")
        if owner == "pickle" and node.func.attr in ("load", "loads"):
            found.append(f"line {node.lineno}: pickle.{node.func.attr}")
        if isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is True:
            found.append(f"line {node.lineno}: allow_pickle=True")
    return found


def test_unsafe_load_check_is_live():
    assert len(unsafe_loads("import torch\ntorch.load(p)\ntorch.load(p, weights_only=False)\n")) == 2
    assert unsafe_loads("torch.load(p, map_location='cpu', weights_only=True)") == []
    assert unsafe_loads("import numpy as np\nnp.load(p, allow_pickle=True)\npickle.loads(b)")


def test_no_unsafe_deserialization_in_the_package():
    files = sorted((ROOT / "fm_ray").rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py"))
    assert len(files) > 10
    found = {str(f.relative_to(ROOT)): unsafe_loads(f.read_text()) for f in files}
    assert {f: v for f, v in found.items() if v} == {}


def test_dependency_floors_exclude_unsafe_torch_load_and_unauthenticated_ray():
    text = (ROOT / "pyproject.toml").read_text()

    def floor(package: str) -> tuple[int, ...]:
        m = re.search(rf'"{re.escape(package)}(?:\[[a-z,]+\])?>=([\d.]+)"', text)
        assert m, package
        return tuple(int(x) for x in m.group(1).split("."))

    assert floor("torch") >= (2, 6) and floor("torchvision") >= (0, 21) and floor("ray") >= (2, 52)


# --------------------------------------------------------------------------------------------
# The launcher's head settings on a real local head: the Jobs API refuses calls without the token


def _http(url: str, token: str | None = None, body: dict | None = None) -> int:
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=20) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.ray
def test_head_started_as_the_launcher_starts_it_refuses_unauthenticated_jobs(tmp_path):
    """`ray start --head` with the auth env and --dashboard-host of clusters/aws-gpu.yaml's head command
    (ports made free, loopback only): no token -> 401, a wrong one -> 403, the right one -> 200; and the
    Jobs API is not reachable on the machine's other addresses."""
    import secrets
    import signal

    (head,) = [c for c in load("aws-gpu.yaml")["head_start_ray_commands"] if "ray start" in c]
    env_from_config = dict(re.findall(r"export (\w+)=(\S+);", head))
    dashboard_host = re.search(r"--dashboard-host[= ](\S+)", head).group(1)
    assert env_from_config == {"RAY_AUTH_MODE": "token"} and dashboard_host == "127.0.0.1"

    token = secrets.token_hex(32)
    short = tempfile.mkdtemp(prefix="fmra", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, **env_from_config, "RAY_AUTH_TOKEN": token, "HOME": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    port = _free_port()
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    flags = ["port", "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port"]
    flags += ["metrics-export-port", "runtime-env-agent-port"]
    cmd = [ray_bin, "start", "--head", "--block", "--num-cpus=1", f"--dashboard-host={dashboard_host}"]
    cmd += [f"--dashboard-port={port}", f"--temp-dir={short}/ray", "--include-dashboard=true"]
    cmd += [f"--{flag}={_free_port()}" for flag in flags]
    with open(tmp_path / "head.log", "w") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # waits on the head answering; the ceiling only stops a hang
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if _http(f"{url}/api/version", token) == 200:
                    break
            except OSError:
                pass
            time.sleep(1)
        assert proc.poll() is None and _http(f"{url}/api/version", token) == 200, (tmp_path / "head.log").read_text()

        submit = {"entrypoint": "echo this must never run"}
        assert _http(f"{url}/api/jobs/", None, submit) == 401
        assert _http(f"{url}/api/jobs/", secrets.token_hex(32), submit) == 403
        assert _http(f"{url}/api/jobs/") == 401
        assert _http(f"{url}/api/jobs/", token) == 200  # the token holder may list (and submit) jobs

        from ray._private.services import get_node_ip_address

        ip = get_node_ip_address()
        if not ip.startswith("127."):
            with pytest.raises(OSError), socket.create_connection((ip, port), timeout=5):
                pass
    finally:
        # The head's process group: GCS, raylet, dashboard and their children, nothing else. SIGKILL:
        # Ray's graceful stop takes a minute on a busy machine; workers exit when their raylet dies.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        shutil.rmtree(short, ignore_errors=True)


def test_readme_submits_one_large_run_with_its_driver_on_a_gpu_node():
    """`ray job submit -- fm-ray run ... --driver-gpus 1`: the recipe leaves the GPU-less head, and
    its driver task fits the smallest launcher GPU node."""
    text = (CLUSTERS / "README.md").read_text().replace("\\\n", " ")
    submits = [line for line in text.splitlines() if "ray job submit" in line and "fm-ray run" in line]
    assert submits, "no `ray job submit ... -- fm-ray run` in clusters/README.md"
    node_cpus = gpu_node_cpus()
    for line in submits:
        args, _, _ = parse_fm_ray(re.search(r"(fm-ray run\b.*)", line).group(1))
        assert args.driver_gpus == 1 and 0 < args.driver_cpus <= node_cpus, line
        assert Path(args.out).is_absolute()  # not inside the job's temporary working dir


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_metrics_port_is_pinned_and_firewalled(name):
    """Ray's /metrics binds every interface and needs no token: its port is fixed on every node so
    the documented firewall rule (clusters/README.md, Security) can admit only the cluster to it."""
    for cmd in ray_start_commands(load(name)):
        assert re.search(r"--metrics-export-port=8080\b", cmd), cmd
    security = (CLUSTERS / "README.md").read_text().split("## Security", 1)[1]
    assert "--metrics-export-port=8080" in security
    assert "sudo ufw allow from <cluster subnet> to any port 8080 proto tcp && sudo ufw deny 8080/tcp" in security


def documented_token_steps() -> list[str]:
    """Every documented command line that makes the token (cluster files' headers, the README's steps)."""
    steps = []
    for path in [CLUSTERS / "README.md", *(CLUSTERS / n for n in sorted(LAUNCHER))]:
        for line in path.read_text().splitlines():
            cmd = line.lstrip("# ").split("  #")[0].strip()
            if cmd.startswith("ray get-auth-token --generate"):
                steps.append(cmd)
    return steps


def test_documented_token_step_leaves_the_token_private(tmp_path):
    """`ray get-auth-token --generate` writes ~/.ray/auth_token with mode 0644; every documented
    step that makes it also makes it private. Run for real in a temporary home (no network)."""
    steps = documented_token_steps()
    assert len(steps) == 1 + len(LAUNCHER), steps
    assert len(set(steps)) == 1, steps
    ray_bin = Path(sys.executable).with_name("ray")
    env = dict(os.environ, HOME=str(tmp_path), PATH=f"{ray_bin.parent}{os.pathsep}{os.environ['PATH']}")
    subprocess.run(["bash", "-c", steps[0]], env=env, check=True, capture_output=True, timeout=120)
    token = tmp_path / ".ray" / "auth_token"
    assert token.stat().st_mode & 0o777 == 0o600
