"""A training run's configuration, built from params and checked in the driver, before Ray or MLflow start.

`TrainConfig` is everything one run needs (plain values, so it travels to Ray workers as is);
`configs_from_params` builds one per seed from params.yaml's `train`, `inputs.<dataset>` and `models.<model>`.
One schema checks them: the config dataclasses' own field types (`TrainConfig`, each model's `Config`), with the
ranges and choices below, validated by pydantic (values given as text, `--set train.lr=1e-3`, are converted).
Every problem is one line, `<file>: <key>: <problem>`: a configuration error stops the stage at once and never
reaches a Ray worker, where it would be retried as a lost worker and leave a FAILED run behind.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, create_model

from erc.data.canonical import check_contents
from erc.data.dialogues import IGNORE
from erc.errors import ErcDataError
from erc.models import MODELS
from erc.models.checkpoint import MODEL_FILES
from erc.schema import check

SELECT = "val_wf1"  # model selection under erc's protocol: validation weighted F1, nothing else (see PROTOCOLS)
PROTOCOLS = {
    "validation": "erc's: the epoch with the best validation weighted F1, early stopping, test scored once",
    # What the official code of most ERC papers does, kept apart so that its figures can be compared with theirs:
    # no validation split (its dialogues are trained on), a fixed epoch count, the test split scored every epoch
    # and the best test epoch reported (the last epoch's beside it). Runs go to the `<experiment>-paper`
    # experiment, tagged protocol=paper, are never registered and are refused by the leaderboard. Feature statistics
    # and `balanced` class weights still come from the training split alone (as the official harnesses here had them).
    "paper": "the official code's: no validation, fixed epochs, test every epoch, best test epoch reported",
}

@dataclass
class TrainConfig:
    """Everything one training run needs; plain values only, so it travels to Ray workers as is."""

    dataset: str
    prepared: str  # prepared dataset directory
    inputs: dict  # modality -> feature set name
    model: str = "baseline"
    model_config: dict = field(default_factory=dict)
    feature_dirs: list = field(default_factory=list)  # extra directories holding computed feature sets
    seed: int = 0
    epochs: int = 30
    patience: int = 8  # epochs without validation improvement before stopping
    batch_size: int = 16  # dialogues per optimizer step, over all workers together
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # adamw (decoupled decay) | adam (L2 added to the gradient, as most official ERC code)
    grad_clip: float = 1.0
    class_weights: str | list = "none"  # the dataset's policy, alike for every model: none | balanced | a CLASS_WEIGHTS name
    speakers: str = "appearance"  # speaker index: appearance (order of first turn in the dialogue) | name (sorted
    # speaker names of the whole dataset: IEMOCAP's Female/Male, the official SDT code's gender index)
    protocol: str = "validation"  # validation (selection on validation, test once) | paper (see PROTOCOLS)
    paper_train_on_valid: bool = True  # paper protocol: the validation dialogues are trained on (no validation)
    paper_entry: bool = False  # apply params' paper.<model>.<dataset> (always so under the paper protocol): the
    # official configuration, selected on validation when the protocol is erc's
    grad_accum_steps: int = 1  # micro-batches per worker per optimizer step
    num_workers: int = 0  # 0: Ray Train's local mode, the loop in this process; N: a worker group of N
    cpus_per_worker: float | None = None  # None: the machine's CPUs shared evenly
    parallel_seeds: str | int = "auto"  # local mode on CPU: processes training the seeds side by side (auto: as
    # many as the CPUs hold at cpus_per_worker threads each); the driver records the number it used (1: one process)
    use_gpu: bool = False  # one GPU per worker
    placement_strategy: str = "PACK"  # Ray placement of the workers: PACK, SPREAD, STRICT_SPREAD, STRICT_PACK
    backend: str = "auto"  # ddp | deepspeed | auto (DeepSpeed on GPUs, DDP on CPU)
    precision: str = "auto"  # fp32 | bf16 | fp16 (deepspeed only) | auto (bf16 on GPUs, fp32 on CPU)
    zero_stage: int = 2  # DeepSpeed ZeRO stage (0-2: optimizer state and gradients partitioned)
    offload_optimizer: bool = False  # DeepSpeed: optimizer state in CPU memory (uses DeepSpeed's CPU Adam)
    max_failures: int = 2  # worker-group restarts from the latest checkpoint before the run fails
    checkpoint_every: int = 5  # epochs between checkpoints (and one at each seed's end): at most this many redone
    storage_path: str = "ray_results"  # checkpoints; a shared path or s3://... URI on a cluster
    experiment: str = "erc"
    tracking_uri: str | None = None
    run_id: str | None = None  # the MLflow run the workers log epochs into

    @property
    def features_tag(self) -> str:
        return "+".join(f"{m}:{n}" for m, n in sorted(self.inputs.items()))


# Named class weights, for the variants that reproduce a paper's setting (never a model's default).
CLASS_WEIGHTS = {
    # the official SDT code's IEMOCAP weights, 1 / class frequency, in erc's label order hap, sad, neu, ang, exc, fru
    "sdt_iemocap": {"labels": ["hap", "sad", "neu", "ang", "exc", "fru"], "weights": [1 / 0.086747, 1 / 0.144406, 1 / 0.227883, 1 / 0.160585, 1 / 0.127711, 1 / 0.252668]},
}

def class_weights_for(policy, labels: list[str], train_labels: np.ndarray, source: str) -> list[float] | None:
    """The loss's class weights under a dataset's policy: `none`, `balanced` (n / (C x count) over the training
    split's labelled utterances, as scikit-learn's), a CLASS_WEIGHTS name, or an explicit list."""
    if policy in (None, "none"):
        return None
    if policy == "balanced":
        counts = np.bincount(train_labels[train_labels != IGNORE], minlength=len(labels)).astype(np.float64)
        return (counts.sum() / (len(labels) * np.maximum(counts, 1))).tolist()
    if isinstance(policy, str):
        if policy not in CLASS_WEIGHTS:
            raise ErcDataError(source, f"class_weights {policy!r}: not none, balanced or one of {sorted(CLASS_WEIGHTS)}")
        named = CLASS_WEIGHTS[policy]
        if list(named["labels"]) != list(labels):
            raise ErcDataError(source, f"class_weights {policy!r} are for labels {named['labels']}, not {labels}")
        return list(named["weights"])
    if len(policy) != len(labels):
        raise ErcDataError(source, f"class_weights has {len(policy)} values for {len(labels)} labels {labels}")
    return [float(w) for w in policy]

def configs_from_params(params: dict, dataset: str, model: str, *, source="params.yaml", seeds=None,
                        modalities=None, model_overrides: dict | None = None) -> list[TrainConfig]:
    """One TrainConfig per seed from params.yaml's `train`, `inputs.<dataset>` and `models.<model>` sections.

    Train settings apply in order: `train`, `train.per_model.<model>`, `train.per_dataset.<dataset>`,
    `train.per_model.<model>.per_dataset.<dataset>`; the model's config is `models.<model>` updated with
    `models.<model>.per_dataset.<dataset>` (a paper's per-dataset values). `class_weights` is a dataset's policy,
    the same for every model, so it may be set in `train` and `train.per_dataset` only. `modalities` keeps a
    subset of the dataset's inputs (a unimodal teacher); `model_overrides` adds config keys that the pipeline
    decides (a teacher checkpoint).
    """
    if model not in MODELS:
        raise ErcDataError(source, f"unknown model {model!r}; registered: {sorted(MODELS)}")
    if dataset not in params.get("inputs", {}):
        raise ErcDataError(source, f"no inputs.{dataset} entry (which feature set feeds which modality)")
    inputs = inputs_of(params, dataset, source=source)
    if modalities is not None:
        missing = set(modalities) - set(inputs)
        if missing:
            raise ErcDataError(source, f"inputs.{dataset} has no {sorted(missing)} modality")
        inputs = {m: inputs[m] for m in modalities}
    shared = train_settings(params, dataset, model, source=source)  # typed and range-checked
    model_params = dict(params.get("models", {}).get(model) or {})
    model_dataset = (model_params.pop("per_dataset", None) or {}).get(dataset) or {}  # a paper's per-dataset values
    paper_model = {}
    if shared.get("protocol") == "paper" or shared.get("paper_entry"):  # runs with the official code's settings
        paper_train, paper_model = paper_settings(params, dataset, model, source=source)
        shared.update(paper_train, paper_entry=True)
        shared["experiment"] = f"{shared.get('experiment', TrainConfig.experiment)}-paper"
    model_config = model_settings(model, {**model_params, **model_dataset, **paper_model, **(model_overrides or {})},
                                  source=source)
    data = params.get("data_dir", "data")  # a shared path on a cluster, so that every node sees it
    if not isinstance(data, str) or not data:
        raise ErcDataError(source, f"data_dir: a folder expected, got {data!r}")
    return [TrainConfig(dataset=dataset, prepared=f"{data}/prepared/{dataset}",
                        feature_dirs=[f"{data}/features/{dataset}"], inputs=inputs, model=model,
                        model_config=model_config, seed=seed, **shared)
            for seed in (seeds if seeds is not None else seeds_of(params, source=source))]


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
    "optimizer": Literal["adamw", "adam"],
    "speakers": Literal["appearance", "name"],
    "protocol": Literal[tuple(PROTOCOLS)],
    "parallel_seeds": Literal["auto"] | Annotated[int, Field(ge=1)],
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
    return schema_of(TrainConfig, skip=NOT_PARAMS, ranges=lambda n: TRAIN_RANGES.get(n, {}), choices=TRAIN_CHOICES)


@functools.cache
def model_schema(model: str) -> type[BaseModel]:
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


def paper_settings(params: dict, dataset: str, model: str, *, source) -> tuple[dict, dict]:
    """`paper.<model>.<dataset>`: the official code's training (`train`) and model (`model`) settings, applied over
    everything else under `train.protocol: paper`. Its class weights are the official code's own, so they may be
    set here (unlike train.per_model); an entry may be missing (the params' own settings then, under the protocol)."""
    entry = ((params.get("paper") or {}).get(model) or {}).get(dataset) or {}
    key = f"paper.{model}.{dataset}"
    if not isinstance(entry, dict) or set(entry) - {"train", "model", "note"}:
        raise ErcDataError(source, f"{key}: a section with train, model (and note) expected, got {entry!r}")
    train = checked(train_schema(), entry.get("train") or {}, source=source, key=f"{key}.train")
    for own in ("protocol", "paper_entry"):
        if own in train:
            raise ErcDataError(source, f"{key}.train.{own}: set by train.{own}, not by an entry")
    if "class_weights" in train:
        check_class_weights(train["class_weights"], source=source, key=f"{key}.train.class_weights")
    return train, checked(model_schema(model), entry.get("model") or {}, source=source, key=f"{key}.model")


def check_class_weights(policy, *, source, key: str) -> None:
    """none, balanced, a named policy of CLASS_WEIGHTS, or a list of positive weights (whether a name or
    a list fits the dataset's labels is checked where the labels are read)."""
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
    """`tune`: a Ray Tune search (the space itself is checked by erc.training.tune.space_for)."""

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
    teacher = check(TeacherParams, params.get("teacher") or {}, source=source, prefix="teacher")
    if teacher.model not in MODELS:
        raise ErcDataError(source, f"teacher.model: unknown model {teacher.model!r}; registered: {sorted(MODELS)}")
    return teacher


def tune_settings(params: dict, *, source) -> TuneParams:
    return check(TuneParams, params.get("tune") or {}, source=source, prefix="tune")


def needs_teacher(model: str) -> bool:
    """A distilled model: it learns from a frozen teacher's checkpoint (SUMMER)."""
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
    """Every path a run reads exists, and holds what the run will read (`canonical.check_contents`: the table
    whole, each feature file's width, rows and finiteness): the prepared dataset, its input feature sets, a teacher
    checkpoint. Each problem names the path first, then the param or option that leads to it."""
    teacher = cfg.model_config.get("teacher_checkpoint")
    if teacher:
        missing = [name for name in MODEL_FILES if not (Path(teacher) / name).is_file()]
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
    check_contents(prepared, extra_feature_dirs=cfg.feature_dirs, feature_names=list(cfg.inputs.values()))
