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


def test_the_tracking_server_takes_no_request_without_a_login():
    """The head's `mlflow server` listens beyond loopback only behind MLflow's basic-auth app (installed there with
    its extra), configured by the ini the launcher copies; the RayJob's head and workers get the login from a Secret."""
    import configparser

    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    servers = [shlex.split(c.split("nohup", 1)[1]) for c in config["head_start_ray_commands"] if "mlflow server" in c]
    assert servers
    for command in servers:
        host = command[command.index("--host") + 1]
        assert host.startswith("127.") or command[command.index("--app-name") + 1] == "basic-auth", command
    started = next(c for c in config["head_start_ray_commands"] if "mlflow server" in c)
    ini = next(local for remote, local in config["file_mounts"].items()
               if remote.endswith("/mlflow-auth.ini") and "MLFLOW_AUTH_CONFIG_PATH=$HOME/" + remote.split("/home/ubuntu/")[1] in started)
    auth = configparser.ConfigParser()
    auth.read(ROOT / ini)  # as mlflow.server.auth.config.read_auth_config does
    assert auth["mlflow"]["admin_username"] == "erc" and auth["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    assert auth["mlflow"]["database_uri"].startswith("sqlite:////mnt/erc/")  # on the shared file system
    assert "admin_password" not in auth["mlflow"]  # made on the head, never in the repository
    assert any("mlflow[auth]" in c for c in config["head_setup_commands"])  # the app's own dependencies (Flask-WTF)
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("~/.mlflow/credentials" in c for c in commands)  # drivers and workers log in

    job = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    for group in [job["headGroupSpec"], *job["workerGroupSpecs"]]:
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "erc-mlflow-auth"
