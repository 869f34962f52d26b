"""A trained model's files, and finding them in MLflow.

A checkpoint is a folder of two files: `model.pt` (the weights and the training split's feature statistics,
loaded with `weights_only`, so no code is unpickled) and `model.json` (the model's name, config and spec, and
whatever the trainer records with it). `load_model` finds the files a training run logged, by run id, logged
model id or registered name, and loads them with what prediction needs.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from erc.errors import ErcDataError
from erc.models import ModelSpec, build_model

MODEL_FILES = ("model.pt", "model.json")  # what `load_checkpoint` reads
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def save_checkpoint(directory, model, *, name: str, config: dict, spec: ModelSpec, feature_stats: dict,
                    **info) -> None:
    """`model` into `directory`: weights and feature statistics (name -> (mean, std) arrays) in model.pt; its name,
    config and spec, and `info` (the epoch, the training config, metrics) in model.json."""
    directory = Path(directory)
    stats = {n: {"mean": torch.from_numpy(m), "std": torch.from_numpy(s)} for n, (m, s) in feature_stats.items()}
    torch.save({"state_dict": model.state_dict(), "feature_stats": stats}, directory / "model.pt")
    (directory / "model.json").write_text(json.dumps(
        {"model": name, "model_config": config, "spec": asdict(spec), **info}, indent=2) + "\n")


def load_checkpoint(directory, config_overrides: dict | None = None):
    """The model saved by `save_checkpoint`, and its metadata (weights only: no code is unpickled).
    `config_overrides` replace model config values (a teacher checkpoint that now lives elsewhere)."""
    directory = Path(directory)
    info = json.loads((directory / "model.json").read_text())
    state = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
    model = build_model(info["model"], ModelSpec(**info["spec"]), {**info["model_config"], **(config_overrides or {})})
    model.load_state_dict(state["state_dict"])
    return model.eval(), info


@dataclass
class LoadedModel:
    model: torch.nn.Module
    info: dict  # tracking.MODEL_INFO: labels, inputs, feature sets
    stats: dict  # feature set -> (mean, std) of the training split
    source: str  # how it was found, for messages

def _logged_model(client, model_id: str, source: str) -> str:
    try:
        return client.get_logged_model(model_id).artifact_location
    except Exception:
        raise ErcDataError(source, f"logged model {model_id} not found in the tracking store") from None

def model_location(client, ref: str) -> tuple[str, str]:
    """(artifact URI, description) of a run id, models:/<model id>, or a registered name[/version | @alias]
    (with or without models:/; a name alone is its latest version)."""
    ref = ref.strip()
    target = ref[len("models:/"):] if ref.startswith("models:/") else ref
    if RUN_ID.match(target):
        try:
            run = client.get_run(target)
        except Exception:
            raise ErcDataError(f"mlflow run {target}", "not found in the tracking store") from None
        outputs = run.outputs.model_outputs if run.outputs else []
        if not outputs:
            raise ErcDataError(f"mlflow run {target}", "has no logged model (trained before erc logged models?)")
        return _logged_model(client, outputs[-1].model_id, f"mlflow run {target}"), f"run {target}"
    if target.startswith("m-"):
        return _logged_model(client, target, f"model {ref}"), f"logged model {target}"
    name, alias, version = target, None, None
    if "@" in target:
        name, alias = target.split("@", 1)
    elif "/" in target:
        name, version = target.rsplit("/", 1)
    try:
        if alias:
            mv = client.get_model_version_by_alias(name, alias)
        elif version:
            mv = client.get_model_version(name, version)
        else:
            mv = max(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    except Exception:
        raise ErcDataError(f"registered model {ref}", "not found in the model registry") from None
    return client.get_model_version_download_uri(name, mv.version), f"{name} version {mv.version}"

def load_model(ref: str, tracking_uri: str | None = None) -> LoadedModel:
    """The model named by `ref` (see `model_location`), its prediction info and feature statistics."""
    import mlflow

    from erc import tracking

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = tracking_uri or tracking.tracking_uri()
    location, source = model_location(mlflow.MlflowClient(uri), ref)
    with tempfile.TemporaryDirectory(prefix="erc-model-") as download:
        tmp = mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=download, tracking_uri=uri)
        return load_logged(tmp, source)


def load_logged(directory, source: str | None = None) -> LoadedModel:
    """A logged erc model from its downloaded files (what `erc.tracking.log_trained_model` logs): `load_model` once
    downloaded, and MLflow's pyfunc loader (`erc.serving.pyfunc`), which is handed the directory."""
    from erc import tracking

    directory = Path(directory)
    source = source or str(directory)
    info_path = directory / tracking.MODEL_INFO
    if not info_path.is_file():
        raise ErcDataError(source, f"has no {tracking.MODEL_INFO}: not an erc model")
    info = json.loads(info_path.read_text())
    # A distilling model's teacher travels with it; the weights of both are in model.pt (weights only).
    overrides = {"teacher_checkpoint": str(directory / "teacher")} if (directory / "teacher").is_dir() else None
    model, _ = load_checkpoint(directory, overrides)
    state = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
    stats = {name: (s["mean"].numpy(), s["std"].numpy()) for name, s in state["feature_stats"].items()}
    return LoadedModel(model.eval(), info, stats, source)
