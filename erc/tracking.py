"""MLflow: where runs go, what every run records, and the pictures it keeps."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

EXPERIMENT = "erc"


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` if set, else a sqlite store in the working directory (mlflow.db, artifacts in mlruns/).

    DVC runs every stage from the project root, so by default that is the project's own store.
    """
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def sqlite_artifact_root(uri: str) -> Path:
    """`mlruns/` beside a sqlite store's database file (the project's own for an in-memory store)."""
    path = uri[len("sqlite:///"):].split("?")[0] if uri.startswith("sqlite:///") else ""
    if not path or path == ":memory:":
        return Path.cwd() / "mlruns"
    return Path(path).resolve().parent / "mlruns"


def experiment_id(name: str = EXPERIMENT, uri: str | None = None) -> str:
    import mlflow

    client = mlflow.MlflowClient(uri or tracking_uri())
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if (uri or tracking_uri()).startswith("sqlite:"):
        location = sqlite_artifact_root(uri or tracking_uri()).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created meanwhile by another process
        return client.get_experiment_by_name(name).experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def confusion_png(cm: np.ndarray, labels: list[str], title: str, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.1 * len(labels) + 2, 1.1 * len(labels) + 1.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def log_confusion(client, run_id: str, cm: np.ndarray, labels: list[str], title: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "confusion_test.png"
        confusion_png(cm, labels, title, path)
        client.log_artifact(run_id, str(path))
        (Path(tmp) / "confusion_test.csv").write_text(
            ",".join(["true\\pred", *labels]) + "\n"
            + "".join(",".join([labels[i], *map(str, row)]) + "\n" for i, row in enumerate(cm.tolist())))
        client.log_artifact(run_id, str(Path(tmp) / "confusion_test.csv"))


def log_predictions(client, run_id: str, task, pred: dict) -> None:
    """The test predictions as `test_predictions.csv` (dialogue_id, utterance_id, actual, predicted[, scores]):
    the leaderboard's intervals and paired tests resample them by dialogue."""
    import pandas as pd

    table = task.prepared.table
    labels = np.asarray(task.labels, dtype=object)
    df = pd.DataFrame({"dialogue_id": table["dialogue_id"].to_numpy()[pred["rows"]],
                       "utterance_id": table["utterance_id"].to_numpy()[pred["rows"]],
                       "actual": labels[pred["true"]], "predicted": labels[pred["pred"]]})
    if "score_pred" in pred:
        df["score_actual"], df["score_predicted"] = pred["score_true"], pred["score_pred"]
    with tempfile.TemporaryDirectory() as tmp:
        df.to_csv(Path(tmp) / "test_predictions.csv", index=False)
        client.log_artifact(run_id, str(Path(tmp) / "test_predictions.csv"))


def log_params(client, run_id: str, params: dict) -> None:
    """All params in a few batched writes (MLflow takes at most 100 per batch, values up to 6000 characters)."""
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start:start + 100])


# The packages whose versions are a run's params (every installed package is in its environment artifact).
STACK = ("torch", "transformers", "ray", "mlflow", "dvc", "deepspeed", "pandas", "numpy", "optuna", "erc")


def environment() -> dict[str, str]:
    """Every installed distribution and its version, plus Python's: the software a run used."""
    import importlib.metadata
    import platform

    found = {d.metadata["Name"].lower(): d.version for d in importlib.metadata.distributions() if d.metadata["Name"]}
    return {"python": platform.python_version(), **dict(sorted(found.items()))}


def log_environment(client, run_id: str) -> None:
    """The environment as `environment/requirements.txt` (pip's format, installable with `pip install -c`) and
    the core stack's versions as `env.<package>` params."""
    env = environment()
    log_params(client, run_id, {f"env.{name}": env.get(name, "absent") for name in ("python", *STACK)})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "requirements.txt"
        path.write_text(f"# python {env['python']}\n" + "".join(f"{k}=={v}\n" for k, v in env.items() if k != "python"))
        client.log_artifact(run_id, str(path), "environment")
