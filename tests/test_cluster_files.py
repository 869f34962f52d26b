"""The cluster files in pipelines/cluster/ stay valid: the launcher config against Ray's own schema, and the
RayJob's entrypoint against the train stage (its params overrides name real params)."""

import shlex
from pathlib import Path

import yaml

from erc.params import load_params

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "pipelines" / "cluster"


def test_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(config))  # raises on an unknown or missing field
    assert config["head_node_type"] in config["available_node_types"]


def overrides_name_existing_params(command: list[str], params: dict) -> None:
    keys = [command[i + 1].split("=", 1)[0] for i, word in enumerate(command) if word == "--set"]
    assert keys
    for key in keys:
        node = params
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"--set {key}: no such param in params.yaml"
            node = node[part]


def test_rayjob_runs_the_train_stage_with_real_params():
    job = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[:2] == ["python", "pipelines/train.py"]
    overrides_name_existing_params(command, load_params(ROOT / "params.yaml"))
    assert "MLFLOW_TRACKING_URI" in yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert f"train.num_workers={workers['replicas']}" in command


def test_launcher_usage_names_real_params():
    usage = [line.lstrip("#").strip().rstrip("\\").strip() for line in (CLUSTER / "ray-cluster.yaml").read_text().splitlines()
             if line.startswith("#") and ("--set" in line or "pipelines/train.py" in line)]
    overrides_name_existing_params(shlex.split(" ".join(usage)), load_params(ROOT / "params.yaml"))
