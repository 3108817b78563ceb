"""The cluster files: ``ray-cluster.yaml`` through Ray's own preparation and validation (what
``ray up`` runs: ``ray.autoscaler._private.commands._bootstrap_config`` calls ``prepare_config``,
then ``validate_config``), the KubeRay manifest against the fields of KubeRay's ``ray.io/v1``
RayCluster type (ray-operator/apis/ray/v1/raycluster_types.go), and the Dockerfile's commands
against the README's install and the CLI's options."""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from typer.testing import CliRunner

from im_actors.cli import app

ROOT = Path(__file__).resolve().parents[2]

#: Fields of KubeRay's ray.io/v1 types (raycluster_types.go): RayClusterSpec, HeadGroupSpec, WorkerGroupSpec.
RAYCLUSTER_SPEC = {
    "headGroupSpec",
    "workerGroupSpecs",
    "rayVersion",
    "enableInTreeAutoscaling",
    "autoscalerOptions",
    "headServiceAnnotations",
    "suspend",
}
HEAD_GROUP_SPEC = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP_SPEC = {
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "numOfHosts",
    "rayStartParams",
    "template",
    "scaleStrategy",
}
#: Fields of a Kubernetes core/v1 Container that the manifest may use.
CONTAINER = {
    "name",
    "image",
    "command",
    "args",
    "env",
    "envFrom",
    "ports",
    "resources",
    "volumeMounts",
    "readinessProbe",
    "livenessProbe",
    "startupProbe",
    "lifecycle",
}


def _cluster_yaml() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "ray-cluster.yaml").read_text())
    return loaded


def test_ray_cluster_yaml_passes_rays_own_preparation_and_validation() -> None:
    prepared = prepare_config(copy.deepcopy(_cluster_yaml()))
    validate_config(prepared)  # raises jsonschema.ValidationError or ValueError
    node_type = prepared["available_node_types"][prepared["head_node_type"]]
    assert node_type["min_workers"] == node_type["max_workers"] == 2


def test_rays_validation_is_not_a_no_op() -> None:
    broken = _cluster_yaml()
    broken["setup_comands"] = ["typo"]  # an unknown key: Ray's schema forbids extra fields
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_ray_cluster_yaml_installs_into_a_virtualenv_and_starts_ray_from_it() -> None:
    cfg = _cluster_yaml()
    setup = cfg["setup_commands"]
    assert "python3 -m venv ~/im-venv" in setup[0]
    for command in setup[1:]:
        assert command.startswith("~/im-venv/bin/pip install"), command  # never the system Python (PEP 668)
    assert any("-e ~/im-actors" in c for c in setup)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts and all("~/im-venv/bin/ray start" in c for c in starts)
        assert all("RAY_worker_niceness=0" in c for c in starts)
        assert all(c.startswith("~/im-venv/bin/ray") or "RAY_" in c.split()[0] for c in cfg[key])
    head = next(c for c in cfg["head_start_ray_commands"] if "ray start" in c)
    assert "--port=6379" not in head and "--port=6380" in head  # Redis's port stays free
    assert any(":6380" in c for c in cfg["worker_start_ray_commands"])


def test_the_venv_setup_command_makes_a_working_virtualenv(tmp_path: Path) -> None:
    if subprocess.run([sys.executable, "-c", "import ensurepip"], capture_output=True).returncode != 0:
        pytest.skip("this Python has no ensurepip (python3-venv)")
    command = _cluster_yaml()["setup_commands"][0]
    env = {**os.environ, "HOME": str(tmp_path)}
    subprocess.run(["bash", "-c", command], env=env, check=True, capture_output=True, timeout=120)
    out = subprocess.run([str(tmp_path / "im-venv/bin/pip"), "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and str(tmp_path / "im-venv") in out.stdout


def _manifest() -> dict[str, dict[str, Any]]:
    docs = list(yaml.safe_load_all((ROOT / "deploy/kuberay/raycluster.yaml").read_text()))
    return {d["kind"]: d for d in docs}


def test_kuberay_manifest_uses_only_fields_of_the_raycluster_type() -> None:
    rc = _manifest()["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    assert set(spec) <= RAYCLUSTER_SPEC
    assert spec["rayVersion"] == "2.60.0"  # the version setup.cfg pins
    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP_SPEC and {"rayStartParams", "template"} <= set(head)
    groups = spec["workerGroupSpecs"]
    assert groups
    pods = [head["template"]]
    for group in groups:
        assert set(group) <= WORKER_GROUP_SPEC
        assert {"groupName", "rayStartParams", "template"} <= set(group)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        pods.append(group["template"])
    for params in [head["rayStartParams"], *(g["rayStartParams"] for g in groups)]:
        assert all(isinstance(v, str) for v in params.values())  # map[string]string
    for pod in pods:
        volumes = {v["name"] for v in pod["spec"].get("volumes", [])}
        for container in pod["spec"]["containers"]:
            assert set(container) <= CONTAINER, set(container) - CONTAINER
            assert container["image"] == "im-actors:0.1"
            assert {m["name"] for m in container.get("volumeMounts", [])} <= volumes
            assert all(isinstance(p["containerPort"], int) for p in container.get("ports", []))


def test_kuberay_manifest_configuration_loads_and_its_up_command_parses() -> None:
    from im_actors.config import load_config

    docs = _manifest()
    toml = docs["ConfigMap"]["data"]["im.toml"]
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"im-kuberay-{os.getpid()}.toml"
    path.write_text(toml)
    try:
        cfg = load_config(path)
    finally:
        path.unlink()
    assert cfg.host == "0.0.0.0" and cfg.router_port == 8080 and cfg.hub_port == 8765
    secret_keys = set(docs["Secret"]["stringData"])
    assert {"IM_MONGO_URL", "IM_REDIS_URL", "IM_RABBITMQ_URL", "IM_JWT_SECRET"} <= secret_keys
    head = docs["RayCluster"]["spec"]["headGroupSpec"]["template"]["spec"]
    ports = {p["containerPort"] for c in head["containers"] for p in c.get("ports", [])}
    assert {cfg.router_port, cfg.hub_port} <= ports
    sidecar = next(c for c in head["containers"] if c["name"] == "im-actors-up")
    script = sidecar["command"][-1]
    up = re.search(r"im-actors (up [^&;]*)", script)
    assert up is not None
    _options_exist(shlex.split(up.group(1)))


def _options_exist(argv: list[str]) -> None:
    """Every ``--option`` of ``argv`` is one the CLI's command has (its --help lists it)."""
    command = [a for a in argv if not a.startswith("-")][:1]
    help_text = CliRunner().invoke(app, [*command, "--help"]).output
    for arg in argv:
        if arg.startswith("--"):
            assert arg in help_text, f"{arg} is not an option of im-actors {command[0]}"


def test_dockerfile_installs_as_the_readme_does_and_runs_im_actors_up() -> None:
    text = (ROOT / "deploy/Dockerfile").read_text()
    runs = " ".join(re.findall(r"^RUN (.+?)(?<!\\)$", text.replace("\\\n", " "), flags=re.M))
    readme = (ROOT / "README.md").read_text()
    assert "python3 -m venv .venv && .venv/bin/pip install -e" in readme
    assert re.search(r"python3 -m venv (\S+) && \1/bin/pip install --no-cache-dir -e \.", runs)
    assert "pip install" not in runs.replace("/im-venv/bin/pip install", "")  # no system-Python pip
    assert "RAY_worker_niceness=0" in text
    cmd = re.search(r"^CMD (\[.*\])$", text, flags=re.M)
    assert cmd is not None
    argv = yaml.safe_load(cmd.group(1))
    assert argv[:2] == ["im-actors", "up"]
    _options_exist(argv[1:])
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", text, flags=re.M).group(1).split()}  # type: ignore[union-attr]
    assert {8080, 8765, 8265} <= exposed and 6380 not in exposed
