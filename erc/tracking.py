"""MLflow: where runs go, what every run records, and the pictures it keeps.

erc's experiments are marked as model-training experiments (MLflow 3 opens a GenAI overview otherwise).
At the end of a run, `log_trained_model` records what the runs page shows without configuring anything:
the data as dataset inputs (name, split, digest of the source checksums), the selected checkpoint as a
logged model whose test metrics are linked to it, and that model in the model registry
(`registered_name`), with its feature sets and label names, so that `erc predict` knows how to featurize.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

EXPERIMENT = "erc"
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the UI opens on the runs, not GenAI
MODEL_INFO = "erc_model.json"  # in a logged model: what the model needs at prediction time


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
    """The experiment's id (made if missing). Every erc command that creates runs asks this first: it is where a
    store is opened for writing, so it also ends the runs that killed processes left RUNNING (`end_orphaned_runs`)."""
    import mlflow

    client = mlflow.MlflowClient(uri or tracking_uri())
    end_orphaned_runs(client, uri or tracking_uri())
    found = client.get_experiment_by_name(name)
    if found is not None:
        for key, value in EXPERIMENT_KIND.items():
            if found.tags.get(key) != value:  # a store made before erc marked its experiments
                client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id
    location = None
    if (uri or tracking_uri()).startswith("sqlite:"):
        location = sqlite_artifact_root(uri or tracking_uri()).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except Exception:  # created meanwhile by another process
        return client.get_experiment_by_name(name).experiment_id


OWNER_TAGS = ("driver_host", "driver_pid")  # the process that opened a run, and so must close it


def owner_tags() -> dict:
    """Tags of a run this process opens: a run still RUNNING when this process no longer exists was killed."""
    return dict(zip(OWNER_TAGS, (socket.gethostname(), str(os.getpid()))))


def owner_alive(run) -> bool:
    """Whether the process that opened `run` (its `owner_tags`) still runs on this host: alive, and not a newer
    process that took its pid over. A run of another host, or without the tags, counts as alive: it cannot be
    judged from here."""
    import psutil

    host, pid = (run.data.tags.get(tag, "") for tag in OWNER_TAGS)
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        return psutil.Process(int(pid)).create_time() <= run.info.start_time / 1000 + 1
    except psutil.Error:
        return False


_swept: set = set()


def end_orphaned_runs(client, uri: str) -> list[str]:
    """Mark KILLED the RUNNING runs opened on this host by a process that is gone (`kill -9`, a lost machine
    session): nothing else would ever end them. Once per store and process; returns the runs' ids.

    A run of another host is left alone (its process cannot be seen from here), as is one without the tags."""
    if uri in _swept:
        return []
    _swept.add(uri)
    host, ended = socket.gethostname(), []
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    for run in client.search_runs(experiments, "attributes.status = 'RUNNING' and tags.driver_host = "
                                               f"'{host}'", max_results=50000):
        if not owner_alive(run):
            pid = run.data.tags.get("driver_pid", "")
            client.set_tag(run.info.run_id, "killed_by", f"its process {pid} on {host} is gone")
            client.set_terminated(run.info.run_id, "KILLED")
            ended.append(run.info.run_id)
    return ended


def ui_url(experiment_id: str, base: str = "http://127.0.0.1:5000") -> str:
    """The runs page of an experiment in `mlflow ui`. MLflow 3.17's UI opens on its GenAI overview whatever the
    experiment's kind (a browser setting, GenAI by default); `workflowType=machine_learning` opens the runs."""
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


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
    from matplotlib.figure import Figure  # not pyplot: no backend or global figure state (a second a run to import)

    fig = Figure(figsize=(1.1 * len(labels) + 2, 1.1 * len(labels) + 1.5))
    ax = fig.subplots()
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
    """The test predictions as `test_predictions.csv` (dialogue_id, utterance_id, actual, predicted, p_<label> per
    class[, scores]):
    the leaderboard's intervals and paired tests resample them by dialogue."""
    import pandas as pd

    table = task.prepared.table
    labels = np.asarray(task.labels, dtype=object)
    df = pd.DataFrame({"dialogue_id": table["dialogue_id"].to_numpy()[pred["rows"]],
                       "utterance_id": table["utterance_id"].to_numpy()[pred["rows"]],
                       "actual": labels[pred["true"]], "predicted": labels[pred["pred"]]})
    if "score_pred" in pred:
        df["score_actual"], df["score_predicted"] = pred["score_true"], pred["score_pred"]
    if "probs" in pred:  # what `erc predict` on the same inputs must give again
        for i, label in enumerate(task.labels):
            df[f"p_{label}"] = pred["probs"][:, i]
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


@functools.cache
def environment() -> dict[str, str]:
    """Every installed distribution and its version, plus Python's: the software a run used (read once a process)."""
    import importlib.metadata
    import platform

    found = {}
    for dist in importlib.metadata.distributions():
        name, version = _name_version(dist.read_text("METADATA") or dist.read_text("PKG-INFO") or "")
        if name and version:
            found.setdefault(name.lower(), version)  # the first on sys.path is the one imported
    return {"python": platform.python_version(), **dict(sorted(found.items()))}


def _name_version(metadata: str) -> tuple[str | None, str | None]:
    """Name and Version from a distribution's metadata headers. `dist.metadata` parses the whole file as an
    e-mail message, long description included: 1.1 s for the ~240 packages here, against 0.08 s for the headers."""
    name = version = None
    for line in metadata.splitlines():
        if not line.strip():
            break  # the end of the headers
        key, _, value = line.partition(":")
        if key == "Name":
            name = value.strip()
        elif key == "Version":
            version = value.strip()
    return name, version


def log_environment(client, run_id: str) -> None:
    """The environment as `environment/requirements.txt` (pip's format, installable with `pip install -c`) and
    the core stack's versions as `env.<package>` params."""
    env = environment()
    log_params(client, run_id, {f"env.{name}": env.get(name, "absent") for name in ("python", *STACK)})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "requirements.txt"
        path.write_text(f"# python {env['python']}\n" + "".join(f"{k}=={v}\n" for k, v in env.items() if k != "python"))
        client.log_artifact(run_id, str(path), "environment")


# ---------------------------------------------------------------- datasets, logged models, the registry


def dataset_digest(sources: dict, split: str, inputs: dict) -> str:
    """A split's digest: the source files' sha256 checksums, the split and the feature sets fed to the model."""
    blob = json.dumps({"sources": sources, "split": split, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def dataset_inputs(dataset: str, meta: dict, inputs: dict, source: str) -> list:
    """One MLflow dataset input per split (context train/valid/test) of a prepared dataset."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    found = []
    for split, counts in (meta.get("counts") or {}).items():
        profile = {"utterances": counts.get("utterances"), "dialogues": counts.get("dialogues")}
        data = Dataset(name=dataset, digest=dataset_digest(meta.get("sources", {}), split, inputs),
                       source_type="local", source=json.dumps({"uri": source, "split": split, "inputs": inputs}),
                       profile=json.dumps(profile))
        found.append(DatasetInput(data, tags=[InputTag("mlflow.data.context", split)]))
    return found


def registered_name(dataset: str, model: str, tags: dict) -> str:
    """The registry name of a run's model: erc-<dataset>-<model>, plus its variant and role where not default."""
    parts = ["erc", dataset, model]
    if tags.get("variant", "default") != "default":
        parts.append(tags["variant"])
    if tags.get("role"):
        parts.append(tags["role"])
    return "-".join(parts)


def model_info(cfg, task) -> dict:
    """What prediction needs besides the weights: labels, the feature set of each modality and how it was made."""
    features = {name: {k: v for k, v in task.prepared.features[name].describe().items() if k != "source"}
                for name in cfg.inputs.values()}
    return {"model": cfg.model, "dataset": cfg.dataset, "target": task.target, "labels": list(task.labels),
            "inputs": dict(cfg.inputs), "feature_sets": features, "has_score": task.has_score,
            "speaker_names": task.speaker_names}  # None: indexed by first turn; a list: the index of `speakers: name`


def pyfunc_flavor(directory, model_id: str, run_id: str) -> None:
    """An MLmodel file in `directory`: the logged model as an MLflow pyfunc (`erc.serving.pyfunc`), so that
    `mlflow models serve -m models:/<name>@<alias> --env-manager local` answers with erc's predictions."""
    from mlflow.models import Model
    from mlflow.pyfunc import add_to_model

    mlmodel = Model(model_id=model_id, run_id=run_id)
    add_to_model(mlmodel, loader_module="erc.serving.pyfunc")  # no environment: it runs in erc's own
    mlmodel.save(Path(directory) / "MLmodel")


def log_dataset_inputs(client, run_id: str, datasets: list, attempts: int = 3) -> None:
    """`client.log_inputs`, safe when runs of one experiment log the same dataset at the same moment (the seeds of a
    stage side by side): both find no row for it and both insert one, and the store's unique key refuses the second.
    Its retry finds the row the first wrote and only links it to its run."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            return client.log_inputs(run_id, datasets=datasets)
        except MlflowException:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def log_trained_model(client, cfg, task, checkpoint_dir, metrics: dict) -> str:
    """The run's dataset inputs, its selected checkpoint as a logged model (with `MODEL_INFO` and, for a model
    that distils from a teacher, the teacher's checkpoint under teacher/), its test metrics linked to the model,
    and a new version of the model in the registry. Returns the logged model's id."""
    from mlflow.entities import LoggedModelOutput, Metric

    run = client.get_run(cfg.run_id)
    datasets = dataset_inputs(cfg.dataset, task.prepared.meta, dict(cfg.inputs), cfg.prepared)
    log_dataset_inputs(client, cfg.run_id, datasets)
    info = model_info(cfg, task)
    name = registered_name(cfg.dataset, cfg.model, run.data.tags)
    tags = {"dataset": cfg.dataset, "features": cfg.features_tag, "labels": json.dumps(info["labels"]),
            "seed": str(cfg.seed), "erc_model": cfg.model}
    logged = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=cfg.run_id, tags=tags,
                                        params={"features": cfg.features_tag, "model": cfg.model}, model_type="erc")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for f in Path(checkpoint_dir).iterdir():
                shutil.copy2(f, Path(tmp) / f.name)
            teacher = (cfg.model_config or {}).get("teacher_checkpoint")
            if teacher:
                shutil.copytree(teacher, Path(tmp) / "teacher")
            (Path(tmp) / MODEL_INFO).write_text(json.dumps(info, indent=2) + "\n")
            pyfunc_flavor(tmp, logged.model_id, cfg.run_id)
            client.log_model_artifacts(logged.model_id, tmp)
        client.finalize_logged_model(logged.model_id, "READY")
    except BaseException:
        client.finalize_logged_model(logged.model_id, "FAILED")
        raise
    client.log_outputs(cfg.run_id, [LoggedModelOutput(logged.model_id, 0)])
    test = next((d.dataset for d in datasets if d.tags[0].value == "test"), None)
    now = int(time.time() * 1000)
    linked = {k: v for k, v in metrics.items() if k.startswith("test_")}
    client.log_batch(cfg.run_id, metrics=[
        Metric(k, float(v), now, 0, model_id=logged.model_id, dataset_name=test.name if test else None,
               dataset_digest=test.digest if test else None) for k, v in linked.items()])
    try:
        client.create_registered_model(name, tags={"dataset": cfg.dataset, "erc_model": cfg.model},
                                       description=f"erc {cfg.model} on {cfg.dataset} ({cfg.features_tag})")
    except Exception:  # it exists (an earlier seed or stage)
        pass
    # source: the logged model's artifact location (a models:/ source is resolved through the process-wide tracking
    # URI, not the client's); the sqlite registry does not keep model_id, so the version's tags carry it too.
    client.create_model_version(name, source=logged.artifact_location, run_id=cfg.run_id, model_id=logged.model_id,
                                tags={**tags, "model_id": logged.model_id,
                                      "feature_sets": json.dumps(info["feature_sets"], sort_keys=True)},
                                await_creation_for=0)
    return logged.model_id
