"""Params and inputs checked in the driver, before Ray or MLflow start.

One schema: the config dataclasses' own field types (`erc.train.TrainConfig`, each model's `Config`), with the
ranges and choices below, validated by pydantic (values given as text, `--set train.lr=1e-3`, are converted).
Every problem is one line, `<file>: <key>: <problem>`: a configuration error stops the stage at once and never
reaches a Ray worker, where it would be retried as a lost worker and leave a FAILED run behind.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from erc.errors import ErcDataError
from erc.schema import check

# TrainConfig fields that params do not set (the pipeline fills them in).
NOT_PARAMS = {"dataset", "prepared", "inputs", "model", "model_config", "feature_dirs", "seed", "tracking_uri", "run_id"}
TRAIN_RANGES = {
    "epochs": {"ge": 1}, "patience": {"ge": 1}, "batch_size": {"ge": 1}, "lr": {"gt": 0}, "weight_decay": {"ge": 0},
    "grad_clip": {"ge": 0}, "grad_accum_steps": {"ge": 1}, "num_workers": {"ge": 0}, "cpus_per_worker": {"gt": 0},
    "zero_stage": {"ge": 0, "le": 3}, "max_failures": {"ge": -1}, "checkpoint_every": {"ge": 1},
}
TRAIN_CHOICES = {
    "placement_strategy": Literal["PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"],
    "backend": Literal["auto", "ddp", "deepspeed"],
    "precision": Literal["auto", "fp32", "bf16", "fp16"],
}
TRAIN_SECTIONS = ("seeds", "per_model", "per_dataset")  # the structure of `train`, not TrainConfig fields
# Model config fields, by name: a fraction, a positive size, a positive temperature, a non-negative weight.
MODEL_RANGES = [
    (lambda n: "dropout" in n or n == "smooth_mix", {"ge": 0, "lt": 1}),
    (lambda n: n.endswith(("hidden", "width", "heads", "dim", "rank", "experts", "top_k", "speakers", "window")),
     {"ge": 1}),
    (lambda n: "temperature" in n, {"gt": 0}),
    (lambda n: n.endswith("weight") or n.startswith(("kappa", "gamma")), {"ge": 0}),
]
CHECKPOINT_FILES = ("model.json", "model.pt")  # what erc.train.load_checkpoint reads


def schema_of(cls, *, skip=(), ranges=None, choices=None) -> type[BaseModel]:
    """A pydantic model of a config dataclass: its fields' types and defaults, plus ranges; unknown keys refused."""
    hints = typing.get_type_hints(cls)
    fields = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = (choices or {}).get(f.name, hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        fields[f.name] = (Annotated[kind, Field(**ranges(f.name))] if ranges else kind, default)
    return create_model(cls.__name__, __config__=ConfigDict(extra="forbid"), **fields)


@functools.cache
def train_schema() -> type[BaseModel]:
    from erc.train import TrainConfig

    return schema_of(TrainConfig, skip=NOT_PARAMS, ranges=lambda n: TRAIN_RANGES.get(n, {}), choices=TRAIN_CHOICES)


@functools.cache
def model_schema(model: str) -> type[BaseModel]:
    from erc.models import MODELS

    def ranges(name):
        return next((r for match, r in MODEL_RANGES if match(name)), {})

    return schema_of(MODELS[model].Config, ranges=ranges)


def checked(schema, values, *, source, key: str) -> dict:
    """The values of `values` (a params section), type- and range-checked and converted; unknown keys refused."""
    if not isinstance(values, dict):
        raise ErcDataError(source, f"{key}: a section (key: value lines) expected, got {values!r}")
    return check(schema, values, source=source, prefix=key).model_dump(include=set(values))


def train_settings(params: dict, dataset: str, model: str, *, source) -> dict:
    """The train settings of (dataset, model): `train`, then `per_model.<model>`, `per_dataset.<dataset>` and
    `per_model.<model>.per_dataset.<dataset>`, each layer checked under its own key."""
    train = params.get("train")
    if not isinstance(train, dict):
        raise ErcDataError(source, "train: missing section")
    per_model = dict((train.get("per_model") or {}).get(model) or {})
    per_model_dataset = (per_model.pop("per_dataset", None) or {}).get(dataset) or {}
    layers = [("train", {k: v for k, v in train.items() if k not in TRAIN_SECTIONS}),
              (f"train.per_model.{model}", per_model),
              (f"train.per_dataset.{dataset}", (train.get("per_dataset") or {}).get(dataset) or {}),
              (f"train.per_model.{model}.per_dataset.{dataset}", per_model_dataset)]
    settings = {}
    for key, values in layers:
        if key.startswith("train.per_model") and "class_weights" in values:
            raise ErcDataError(source, f"{key}.class_weights: class weights are a dataset's policy for every model "
                                       f"alike: set train.class_weights or train.per_dataset.{dataset}.class_weights")
        settings.update(checked(train_schema(), values, source=source, key=key))
    check_class_weights(settings.get("class_weights", "none"), source=source, key=f"train.class_weights ({dataset})")
    return settings


def check_class_weights(policy, *, source, key: str) -> None:
    """none, balanced, a named policy of erc.train.CLASS_WEIGHTS, or a list of positive weights (whether a name or
    a list fits the dataset's labels is checked where the labels are read)."""
    from erc.train import CLASS_WEIGHTS

    if isinstance(policy, str):
        if policy not in ("none", "balanced", *CLASS_WEIGHTS):
            raise ErcDataError(source, f"{key}: {policy!r} is not none, balanced or one of {sorted(CLASS_WEIGHTS)}")
    elif not (isinstance(policy, list) and policy and all(isinstance(w, (int, float)) and w > 0 for w in policy)):
        raise ErcDataError(source, f"{key}: a policy name or a list of positive weights expected, got {policy!r}")


def inputs_of(params: dict, dataset: str, *, source) -> dict[str, str]:
    """`inputs.<dataset>`: modality -> feature set name."""
    schema = Annotated[dict[Literal["text", "audio", "video"], str], Field(min_length=1)]
    return check(schema, params["inputs"][dataset], source=source, prefix=f"inputs.{dataset}")


def seeds_of(params: dict, *, source) -> list[int]:
    seeds = (params.get("train") or {}).get("seeds")
    return check(Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)], seeds, source=source,
                 prefix="train.seeds")


def model_settings(model: str, values: dict, *, source) -> dict:
    return checked(model_schema(model), values, source=source, key=f"models.{model}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TeacherParams(_Section):
    """`teacher`: SUMMER's frozen unimodal teacher."""

    model: str = "baseline"
    modality: Literal["text", "audio", "video"] = "text"
    seed: int = Field(0, ge=0)


class TuneParams(_Section):
    """`tune`: a Ray Tune search (the space itself is checked by erc.tune.space_for)."""

    trials: int = Field(20, ge=1)
    epochs: Annotated[int, Field(ge=1)] | None = None  # a trial's most epochs (None: train.epochs)
    cpus_per_trial: Annotated[int | float, Field(gt=0)] = 1
    max_concurrent: Annotated[int, Field(ge=1)] | None = None
    grace_period: int = Field(3, ge=1)
    reduction_factor: int = Field(2, ge=2)
    seed: int = 0
    storage_path: str = "ray_results/tune"
    space: dict = {}


def teacher_settings(params: dict, *, source) -> TeacherParams:
    from erc.models import MODELS

    teacher = check(TeacherParams, params.get("teacher") or {}, source=source, prefix="teacher")
    if teacher.model not in MODELS:
        raise ErcDataError(source, f"teacher.model: unknown model {teacher.model!r}; registered: {sorted(MODELS)}")
    return teacher


def tune_settings(params: dict, *, source) -> TuneParams:
    return check(TuneParams, params.get("tune") or {}, source=source, prefix="tune")


def needs_teacher(model: str) -> bool:
    """A distilled model: it learns from a frozen teacher's checkpoint (SUMMER)."""
    from erc.models import MODELS

    return model in MODELS and any(f.name == "teacher_checkpoint" for f in dataclasses.fields(MODELS[model].Config))


def check_teacher(model: str, teacher: str | None, *, source="command line") -> None:
    """A distilled model needs `--teacher`; any other refuses one (it would be ignored)."""
    if needs_teacher(model) and not teacher:
        raise ErcDataError(source, f"--teacher: {model} distils from a frozen teacher: pass --teacher "
                                   "runs/teacher/<dataset> (stage teacher@<dataset>; in params it belongs in "
                                   "pipeline.distilled); without one it would train with no distillation at all")
    if teacher and not needs_teacher(model):
        raise ErcDataError(source, f"--teacher: {model} has no teacher (only distilled models take one; in params "
                                   "it belongs in pipeline.models)")


def check_inputs(cfg) -> None:
    """Every path a run reads exists: the prepared dataset, its input feature sets, a teacher checkpoint.
    Each problem names the missing path first, then the param or option that leads to it."""
    teacher = cfg.model_config.get("teacher_checkpoint")
    if teacher:
        missing = [name for name in CHECKPOINT_FILES if not (Path(teacher) / name).is_file()]
        if missing:
            raise ErcDataError(teacher, f"--teacher: not a teacher checkpoint ({', '.join(missing)} missing): the "
                                        f"teacher stage writes runs/teacher/{cfg.dataset}")
    prepared = Path(cfg.prepared)
    for name in ("utterances.parquet", "meta.json"):
        if not (prepared / name).is_file():
            raise ErcDataError(prepared, f"data_dir: no prepared dataset here ({name} missing): run `dvc repro "
                                         f"prepare@{cfg.dataset}`, or set data_dir to the folder holding prepared/")
    folders = [prepared / "features", *map(Path, cfg.feature_dirs)]
    for modality, name in cfg.inputs.items():
        if not any((folder / f"{name}.json").is_file() for folder in folders):
            raise ErcDataError(folders[-1], f"inputs.{cfg.dataset}.{modality}: no feature set {name!r} here or in "
                                            f"{folders[0]}: run `dvc repro featurize@{cfg.dataset}`")


def leakage_max_gap(params: dict, *, source) -> float:
    """`leakage.max_gap`: how far (points of weighted F1) validation may lie above test before the probe warns."""
    gap = check(Annotated[float, Field(ge=0)], (params.get("leakage") or {}).get("max_gap", 10.0), source=source,
                prefix="leakage.max_gap")
    return float(gap)
