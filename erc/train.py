"""Training: one loop, run by Ray Train's TorchTrainer workers; selection on validation; test once.

`run_all(configs)` is the driver side: it opens one MLflow run per seed, then trains all of them in one
TorchTrainer (one worker group, the data loaded once per worker) and collects what the runs recorded.
`train_runs` is the worker side: per seed a plain epoch loop that keeps the weights of the best validation
weighted F1, then evaluates those on the test split (the only time test data is read) and closes the run.
A Tune trial runs the same `train_runs` in its own process (`TuneSession`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from erc import config
from erc.data import canonical
from erc.data.dialogues import IGNORE, DialogueData, deal, feature_stats, split_data
from erc.errors import ErcDataError
from erc.io import atomic_path
from erc.metrics import split_metrics
from erc.models import MODELS, ModelSpec, build_model
from erc.models.sdt import IEMOCAP_CLASS_WEIGHTS

SELECT = "val_wf1"  # model selection: validation weighted F1, nothing else


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
    grad_clip: float = 1.0
    class_weights: str | list = "none"  # the dataset's policy, alike for every model: none | balanced | a CLASS_WEIGHTS name
    grad_accum_steps: int = 1  # micro-batches per worker per optimizer step
    num_workers: int = 0  # 0: Ray Train's local mode, the loop in this process; N: a worker group of N
    cpus_per_worker: float | None = None  # None: the machine's CPUs shared evenly
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# Named class weights, for the variants that reproduce a paper's setting (never a model's default).
CLASS_WEIGHTS = {
    # the official SDT code's IEMOCAP weights, 1 / class frequency, in erc's label order hap, sad, neu, ang, exc, fru
    "sdt_iemocap": {"labels": ["hap", "sad", "neu", "ang", "exc", "fru"], "weights": IEMOCAP_CLASS_WEIGHTS},
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
    inputs = config.inputs_of(params, dataset, source=source)
    if modalities is not None:
        missing = set(modalities) - set(inputs)
        if missing:
            raise ErcDataError(source, f"inputs.{dataset} has no {sorted(missing)} modality")
        inputs = {m: inputs[m] for m in modalities}
    shared = config.train_settings(params, dataset, model, source=source)  # typed and range-checked
    model_params = dict(params.get("models", {}).get(model) or {})
    model_dataset = (model_params.pop("per_dataset", None) or {}).get(dataset) or {}  # a paper's per-dataset values
    model_config = config.model_settings(model, {**model_params, **model_dataset, **(model_overrides or {})},
                                         source=source)
    data = params.get("data_dir", "data")  # a shared path on a cluster, so that every node sees it
    if not isinstance(data, str) or not data:
        raise ErcDataError(source, f"data_dir: a folder expected, got {data!r}")
    return [TrainConfig(dataset=dataset, prepared=f"{data}/prepared/{dataset}",
                        feature_dirs=[f"{data}/features/{dataset}"], inputs=inputs, model=model,
                        model_config=model_config, seed=seed, **shared)
            for seed in (seeds if seeds is not None else config.seeds_of(params, source=source))]


@dataclass
class Task:
    """A dataset ready to train on: splits as dialogues, label names, what the model is told."""

    prepared: canonical.Prepared
    target: str
    labels: list[str]
    splits: dict[str, DialogueData]
    spec: ModelSpec
    stats: dict

    @property
    def has_score(self) -> bool:
        return self.spec.has_score


def load_task(cfg: TrainConfig, splits=("train", "valid")) -> Task:
    prep = canonical.load(cfg.prepared, extra_feature_dirs=cfg.feature_dirs, feature_names=list(cfg.inputs.values()))
    target = prep.meta["target"]
    labels = prep.meta[f"{target}_labels"]
    stats = {name: feature_stats(prep, name) for name in cfg.inputs.values()}
    data = {s: split_data(prep, s, cfg.inputs, target, stats) for s in splits}
    train_labels = prep.table.loc[prep.table["split"] == "train", f"{target}_id"].to_numpy().astype(np.int64)
    spec = ModelSpec(
        input_dims={m: prep.features[n].dim for m, n in cfg.inputs.items()},
        num_classes=len(labels),
        num_sentiment_classes=len(prep.meta["sentiment_labels"]) if target == "emotion" else 0,
        has_score=bool(prep.meta.get("has_sentiment_score")),
        class_weights=class_weights_for(cfg.class_weights, labels, train_labels, f"train.class_weights ({cfg.dataset})"),
    )
    return Task(prep, target, labels, data, spec, stats)


_loaded: dict = {}  # the last task this process loaded for training (a reused Tune trial actor trains on it again)


def load_task_cached(cfg: TrainConfig) -> Task:
    """`load_task(cfg)`, loaded once per process for the same data, inputs and class weights."""
    meta = Path(cfg.prepared) / "meta.json"
    key = (cfg.prepared, tuple(cfg.feature_dirs), tuple(sorted(cfg.inputs.items())),
           json.dumps(cfg.class_weights), meta.stat().st_mtime_ns if meta.exists() else 0)
    if key not in _loaded:
        _loaded.clear()
        _loaded[key] = load_task(cfg)
    return _loaded[key]


@torch.inference_mode()
def predict(model, data: DialogueData, batch_size: int = 32, device="cpu", float_dtype=None) -> dict[str, np.ndarray]:
    """Predictions for every labelled utterance of `data`, in table-row order."""
    model.eval()
    if not len(data):
        return {}
    rows, true, pred, score_true, score_pred = [], [], [], [], []
    for batch in data.batches(batch_size):
        out = model(batch.to(device, float_dtype))
        keep = batch.labels != IGNORE
        rows.append(batch.rows[keep].numpy())
        true.append(batch.labels[keep].numpy())
        pred.append(out.logits.argmax(-1).cpu()[keep].numpy())
        if out.score is not None:
            score_true.append(batch.score[keep].numpy())
            score_pred.append(out.score.float().cpu()[keep].numpy())
    return merge_predictions([{"rows": np.concatenate(rows), "true": np.concatenate(true), "pred": np.concatenate(pred),
                               **({"score_true": np.concatenate(score_true), "score_pred": np.concatenate(score_pred)}
                                  if score_pred else {})}])


def merge_predictions(parts: list[dict]) -> dict[str, np.ndarray]:
    """One split's predictions from several workers' parts, in table-row order."""
    parts = [p for p in parts if len(p.get("rows", ()))]
    result = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(result["rows"], kind="stable")
    return {k: v[order] for k, v in result.items()}


def evaluate(model, data: DialogueData, task: Task, prefix: str) -> tuple[dict, np.ndarray, dict]:
    """Metrics, confusion matrix and the predictions themselves, over the whole split."""
    return score(predict(model, data), task, prefix)


def score(p: dict, task: Task, prefix: str) -> tuple[dict, np.ndarray, dict]:
    metrics, cm = split_metrics(p["true"], p["pred"], task.labels, target=task.target,
                                score_true=p.get("score_true"), score_pred=p.get("score_pred"), prefix=prefix)
    return metrics, cm, p


# ---------------------------------------------------------------- checkpoints


MODEL_FILES = ("model.pt", "model.json")  # what `load_checkpoint` reads


def save_checkpoint(directory, model, cfg: TrainConfig, task: Task, epoch: int, metrics: dict) -> None:
    directory = Path(directory)
    stats = {name: {"mean": torch.from_numpy(m), "std": torch.from_numpy(s)} for name, (m, s) in task.stats.items()}
    torch.save({"state_dict": model.state_dict(), "feature_stats": stats}, directory / "model.pt")
    (directory / "model.json").write_text(json.dumps(
        {"model": cfg.model, "model_config": cfg.model_config, "spec": asdict(task.spec), "epoch": epoch,
         "train_config": asdict(cfg), "metrics": metrics}, indent=2) + "\n")


def load_checkpoint(directory, config_overrides: dict | None = None):
    """The model saved by `save_checkpoint`, and its metadata (weights only: no code is unpickled).
    `config_overrides` replace model config values (a teacher checkpoint that now lives elsewhere)."""
    directory = Path(directory)
    info = json.loads((directory / "model.json").read_text())
    state = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
    model = build_model(info["model"], ModelSpec(**info["spec"]), {**info["model_config"], **(config_overrides or {})})
    model.load_state_dict(state["state_dict"])
    return model.eval(), info


# ---------------------------------------------------------------- worker side


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Each epoch (and worker) starts from its own seed, so a run restored at an epoch boundary continues
    exactly as the uninterrupted run would have."""
    return (seed * 1_000_003 + epoch * 1009 + rank) % 2**32


def train_epoch(stepper, data: DialogueData, cfg: TrainConfig, epoch: int, rank: int, world: int) -> dict:
    """One pass over the training split; returns this worker's share of the loss terms and utterance count.

    Every worker walks the same global batches of `cfg.batch_size` dialogues and takes its dealt part (in
    `grad_accum_steps` micro-batches). Each part's loss is weighted by its share of the global batch's labelled
    utterances, so the averaged gradient is the one a single worker would compute on the whole batch.
    """
    parts = world * cfg.grad_accum_steps
    totals, seen, steps = {}, 0, 0
    for indices in data.batch_indices(cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch):
        labelled = data.labelled(indices)
        micro = deal(indices, parts)
        for step in range(cfg.grad_accum_steps):
            part = micro[step * world + rank]
            weight = world * data.labelled(part) / max(labelled, 1)
            if not len(part):  # fewer dialogues than parts: run a real batch at weight 0 to join the all-reduce
                part = indices[:1]
            batch = data.collate(part).to(stepper.device, stepper.input_dtype)
            with stepper.autocast():
                out = stepper(batch)
            stepper.backward(out.loss * weight, sync=step == cfg.grad_accum_steps - 1)
            if weight:
                seen += batch.num_utterances
            for k, v in out.losses.items():  # weight / world: the terms sum over workers to the global mean
                totals[k] = totals.get(k, 0.0) + float(v.detach()) * weight / world
        stepper.step()
        steps += 1
    return {"losses": totals, "steps": steps, "utterances": seen}


def import_in_background(*modules: str) -> None:
    """Start importing `modules` in a thread; a later `import` of them waits for it rather than starting over."""
    import importlib
    import threading

    threading.Thread(target=lambda: [importlib.import_module(m) for m in modules], daemon=True).start()


class Clock:
    """Seconds spent per phase of a run (`time_<phase>_s` metrics in MLflow; benchmarks/overhead.py reads them)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - start)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def metrics(self) -> dict[str, float]:
        return {f"time_{k}_s": v for k, v in self.seconds.items()}


class RayTrainSession:
    """What the loop needs from Ray Train: rank, the checkpoint to restore, and reporting a checkpoint.

    A train-stage run (`evaluate_test`) reports only its checkpoints (its metrics go to MLflow directly) and ends
    each seed with the one look at test. A search's multi-worker trial reports every epoch to Tune instead.
    """

    checkpoints = True

    def __init__(self, evaluate_test: bool = True):
        import ray
        import ray.train
        import ray.train.torch

        self._train = ray.train
        self.evaluate_test = evaluate_test
        self.report_every_epoch = not evaluate_test
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        if ray.is_initialized():
            self.device = ray.train.torch.get_device()
            self.node = ray.get_runtime_context().get_node_id()
        else:  # Ray Train's local mode (num_workers 0): this process, no cluster
            self.device = torch.device(f"cuda:{context.get_local_rank()}" if torch.cuda.is_available() else "cpu")
            self.node = "local"

    def restored(self):
        return self._train.get_checkpoint()

    def report(self, metrics: dict, directory: Path | None) -> None:
        checkpoint = self._train.Checkpoint.from_directory(str(directory)) if directory is not None else None
        self._train.report(metrics, checkpoint=checkpoint)


class TuneSession:
    """A single-worker Tune trial runs the same loop in its own process, with no nested worker group: every
    epoch's metrics go to Tune (ASHA decides on them); no checkpoints (an interrupted trial starts again) and no
    test (a search scores on validation only)."""

    checkpoints = evaluate_test = False
    report_every_epoch = True
    rank, world = 0, 1

    def __init__(self, use_gpu: bool = False):
        import ray

        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.node = ray.get_runtime_context().get_node_id()

    def restored(self):
        return None

    def report(self, metrics: dict, directory: Path | None) -> None:
        from ray import tune

        tune.report(metrics)


def train_runs(runs: list[TrainConfig], session, started_at: float | None = None) -> None:
    """Train `runs` (the seeds of one stage: same data, same model, other seeds) one after another in this worker.

    The data is loaded once and serves every seed. Per seed: epochs with validation selection (the best weights
    are kept in memory and in every checkpoint), early stopping, then, on rank 0, the one evaluation on test of
    the selected weights and everything the run records in MLflow. A checkpoint (every `checkpoint_every`
    epochs and at each seed's end) holds the latest state and the best weights, so a restarted worker group
    resumes at the right seed and epoch and continues exactly as the uninterrupted run would have.
    """
    clock = Clock()
    if started_at is not None:
        clock.add("worker_start", max(0.0, time.time() - started_at))
    import_in_background("mlflow")  # while the data loads
    first = runs[0]
    if first.cpus_per_worker:
        torch.set_num_threads(max(1, round(first.cpus_per_worker)))
    with clock("data_load"):
        task = load_task_cached(first)
    start, resume = 0, None
    restored = session.restored()
    if restored:  # a restarted worker group: go on with the seed (and epoch) of the latest checkpoint
        resume = Path(restored.to_directory())
        state = json.loads((resume / "trainer_state.json").read_text())
        start = state["run"] + 1 if state.get("seed_done") else state["run"]
        resume = None if state.get("seed_done") else resume
    for index in range(start, len(runs)):
        train_one(runs[index], index, task, session, clock, resume)
        clock, resume = Clock(), None  # start-up and data loading are counted once, on the first seed


def train_one(cfg: TrainConfig, index: int, task: Task, session, clock: Clock, restored_dir: Path | None) -> None:
    from erc import distributed

    rank, world = session.rank, session.world
    train, valid = task.splits["train"], task.splits["valid"]
    valid_part = valid.subset(range(rank, len(valid), world))
    seed_everything(cfg.seed)
    with clock("model_build"):
        model = build_model(cfg.model, task.spec, cfg.model_config)
    state = {"run": index, "epoch": -1, "best": -1.0, "best_epoch": -1, "since_best": 0, "restored_from": []}
    best_weights = None
    if restored_dir is not None:
        # A restarted worker group: weights before wrapping, optimizer state after.
        model.load_state_dict(torch.load(restored_dir / "model.pt", weights_only=True)["state_dict"])
        best_weights = torch.load(restored_dir / "best_model.pt", weights_only=True)["state_dict"]
        state = json.loads((restored_dir / "trainer_state.json").read_text())
        stepper = distributed.stepper(cfg, model, world, session.device)
        stepper.load(restored_dir)
        state["restored_from"] = state["restored_from"] + [state["epoch"]]
    else:
        with clock("model_build"):
            stepper = distributed.stepper(cfg, model, world, session.device)

    client = None
    nodes = distributed.gather(session.node)
    if rank == 0 and cfg.run_id:
        import mlflow

        with clock("mlflow"):
            client = mlflow.MlflowClient(cfg.tracking_uri)
            client.set_tag(cfg.run_id, "ray_nodes", str(len(set(nodes))))
            client.set_tag(cfg.run_id, "worker_pid", str(os.getpid()))  # the seeds of a stage share one worker
            if state["restored_from"]:
                client.log_metric(cfg.run_id, "restored_from_epoch", state["epoch"], step=len(state["restored_from"]))

    def checkpoint(metrics: dict) -> None:
        with clock("checkpoint"), tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                save_checkpoint(tmp, stepper.module, cfg, task, state["epoch"], metrics)
                torch.save({"state_dict": best_weights}, Path(tmp) / "best_model.pt")
                (Path(tmp) / "trainer_state.json").write_text(json.dumps(state))
            stepper.save(Path(tmp), rank)
            session.report(metrics, Path(tmp))

    metrics = {}
    for epoch in range(state["epoch"] + 1, cfg.epochs):
        seed_everything(epoch_seed(cfg.seed, epoch, rank))
        stepper.module.train()
        with clock("train"):
            start = time.perf_counter()
            done = train_epoch(stepper, train, cfg, epoch, rank, world)
            seconds = time.perf_counter() - start
        with clock("valid"):
            gathered = distributed.gather({"train": done, "valid": predict(
                stepper.module, valid_part, device=stepper.device, float_dtype=stepper.input_dtype)})
            metrics, _, _ = score(merge_predictions([g["valid"] for g in gathered]), task, prefix="val_")
        losses = {}
        for g in gathered:
            for k, v in g["train"]["losses"].items():
                losses[k] = losses.get(k, 0.0) + v
        metrics.update({f"train_loss_{k}": v / max(done["steps"], 1) for k, v in losses.items()})
        utterances = sum(g["train"]["utterances"] for g in gathered)
        metrics.update({"epoch": epoch, "train_utterances_per_s": utterances / max(seconds, 1e-9),
                        "train_seconds": seconds})
        state["epoch"] = epoch
        state["train_seconds"] = state.get("train_seconds", 0.0) + seconds  # kept across a restart, unlike the clock
        if metrics[SELECT] > state["best"]:  # strictly better: the first best epoch is kept on ties
            state.update(best=metrics[SELECT], best_epoch=epoch, since_best=0)
            best_weights = {k: v.detach().clone() for k, v in stepper.module.state_dict().items()}
        else:
            state["since_best"] += 1
        metrics["best_" + SELECT] = state["best"]
        if client is not None:
            from mlflow.entities import Metric

            with clock("mlflow"):
                now = int(time.time() * 1000)
                client.log_batch(cfg.run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items()])
        stopping = state["since_best"] >= cfg.patience or epoch == cfg.epochs - 1
        if session.checkpoints and not stopping and (epoch + 1) % max(cfg.checkpoint_every, 1) == 0:
            checkpoint(metrics)
        elif session.report_every_epoch:
            session.report(metrics, None)
        if stopping:
            break

    if not session.evaluate_test:  # a search's trial: its caller closes the run
        if client is not None:
            client.log_batch(cfg.run_id, metrics=[_metric(k, v) for k, v in clock.metrics().items()])
        return
    if rank == 0:
        finish_run(cfg, task, stepper, best_weights, state, client, clock)
    state["seed_done"] = True  # a restarted worker group goes on with the next seed
    checkpoint(metrics)
    if client is not None:  # the phase times, the last checkpoint's included
        client.log_batch(cfg.run_id, metrics=[_metric(k, v) for k, v in clock.metrics().items()])


def _metric(key: str, value: float, step: int = 0):
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), step)


def efficiency(model, state: dict, inference_s: float, test_dialogues: int, device) -> dict:
    """What the leaderboard's efficiency columns read: size, training time per epoch, inference time per
    dialogue (the test pass, batch 32), and the worker's peak memory (resident set; the GPU's too when used)."""
    import resource

    params = list(model.parameters())
    out = {"params_total": sum(p.numel() for p in params),
           "params_trainable": sum(p.numel() for p in params if p.requires_grad),
           "train_s_per_epoch": state.get("train_seconds", 0.0) / max(state["epoch"] + 1, 1),
           "infer_ms_per_dialogue": 1000 * inference_s / max(test_dialogues, 1),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux
    if torch.device(device).type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def finish_run(cfg: TrainConfig, task: Task, stepper, best_weights: dict, state: dict, client, clock: Clock) -> None:
    """The one look at test: the selected (best validation) weights, evaluated and recorded with the run."""
    from erc import tracking

    selected = build_model(cfg.model, task.spec, cfg.model_config)
    selected.load_state_dict(best_weights)
    if "test" not in task.splits:  # read once per worker, after the first seed's training
        task.splits["test"] = load_task(cfg, splits=("test",)).splits["test"]
    with clock("test"):
        start = time.perf_counter()
        pred = predict(selected.to(stepper.device), task.splits["test"], device=stepper.device)
        inference = time.perf_counter() - start
        test, cm, pred = score(pred, task, prefix="test_")
    test["selected_epoch"] = state["best_epoch"]
    test["selected_" + SELECT] = state["best"]
    test.update(efficiency(selected, state, inference, len(task.splits["test"]), stepper.device))
    with clock("mlflow"), tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, selected, cfg, task, state["best_epoch"], {SELECT: state["best"]})
        for name in MODEL_FILES:
            client.log_artifact(cfg.run_id, str(Path(tmp) / name), "checkpoint")
        tracking.log_predictions(client, cfg.run_id, task, pred)
        tracking.log_confusion(client, cfg.run_id, cm, task.labels,
                               f"{cfg.dataset} {cfg.model} seed {cfg.seed}: test (epoch {state['best_epoch']})")
        tracking.log_trained_model(client, cfg, task, tmp, test)  # datasets, logged model, registry
    client.log_batch(cfg.run_id, metrics=[_metric(k, v) for k, v in test.items()])
    client.set_terminated(cfg.run_id, "FINISHED")



def train_loop_per_worker(config: dict) -> None:
    """The TorchTrainer's worker function: the seeds of one stage in one worker group."""
    quiet_console()
    train_runs([TrainConfig(**c) for c in config["runs"]], RayTrainSession(config["evaluate_test"]),
               config["started_at"])


# ---------------------------------------------------------------- driver side


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (`ray job submit` sets it), else start a local Ray on 127.0.0.1.

    Ray's own INFO lines (worker group start, every report) stay in its log files, named on the first line;
    warnings and errors still reach the terminal.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
    # Ray Train's controller takes one report per health check (2 s by default) and a worker's report waits
    # for it: with a report every epoch that was 2 s an epoch. Ray processes inherit this from the driver.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    quiet = {"configure_logging": True, "logging_config": ray.LoggingConfig(log_level="WARNING")}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)
    else:
        # A local Ray of its own temp dir, so that Ray processes that look for "the" cluster find this one (through
        # the pointer file written below), not another erc run's or a test session's.
        os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="erc-ray-", dir="/tmp" if os.path.isdir("/tmp") else None))
        # Ray Train's spot-instance preemption watcher has nothing to watch here, and prints an error line per run.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Ray enables token auth on a new local cluster (a token made in ~/.ray if missing) and warns that it did
        # at every start: 18 lines in one quick `dvc exp run`, about nothing a user has to act on.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # The dashboard stays on: Ray's state API (Ray Train's placement-group cleaner, Tune) needs it.
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), _node_ip_address="127.0.0.1", **quiet)
        # ...and its pointer file names it: without one, a Ray process that looks for the cluster (Ray Train's
        # placement-group cleaner) picks among every Ray on the machine and fails when there are several.
        ray._private.utils.write_ray_address(ray._private.worker._global_node.gcs_address)
    logging.getLogger("ray").setLevel(logging.WARNING)
    print(f"ray logs: {ray_log_dir()}", file=sys.stderr)


def quiet_console() -> None:
    """Ray Train's INFO lines (every report, every checkpoint) to its log files only, not to the terminal."""
    for logger in (logging.getLogger(), logging.getLogger("ray.train")):
        for handler in logger.handlers:
            if type(handler).__name__ == "PlainRayHandler":  # the console; the file handlers keep everything
                handler.setLevel(logging.WARNING)


def ray_log_dir() -> str:
    import ray

    try:
        return str(Path(ray._private.worker._global_node.get_session_dir_path()) / "logs")
    except AttributeError:  # joined a cluster through its address: the head keeps them
        return "on the Ray head, under its session directory"


def scaling_config(num_workers: int, use_gpu: bool, cpus_per_worker: float, placement_strategy: str = "PACK"):
    """Ray Train's ScalingConfig. 0 workers is its local mode: the same loop and session API in this process,
    with no Ray cluster, controller or worker group to start (on 2 cores those cost ~40 s a command); nothing
    is distributed, so there is no worker to lose and a failure ends the command."""
    from ray.train import ScalingConfig

    if num_workers == 0:
        for name in ("ray", "ray.train"):  # local mode's INFO lines (every report's metrics) would reach the terminal
            logging.getLogger(name).setLevel(logging.WARNING)
        return ScalingConfig(num_workers=0)
    return ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, placement_strategy=placement_strategy,
                         resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})})


def fit(runs: list[TrainConfig], callbacks=(), evaluate_test: bool = True):
    """Train the runs (seeds of one configuration) in one Ray Train worker group; returns the Ray result.

    `evaluate_test=False`: no test and no closing of the runs (a search's trial, a benchmark), and every
    epoch is reported to Ray (and so to Tune through `TuneReportCallback`)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    cfg = runs[0]
    if cfg.batch_size < max(cfg.num_workers, 1) * cfg.grad_accum_steps:
        raise ValueError(f"batch_size {cfg.batch_size} is smaller than num_workers x grad_accum_steps")
    for r in runs:
        r.cpus_per_worker = r.cpus_per_worker or max(1, (os.cpu_count() or 1) // max(r.num_workers, 1))
    scaling = scaling_config(cfg.num_workers, cfg.use_gpu, cfg.cpus_per_worker, cfg.placement_strategy)
    seeds = "-".join(str(r.seed) for r in runs)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"runs": [asdict(r) for r in runs], "started_at": time.time(),
                           "evaluate_test": evaluate_test},
        scaling_config=scaling,
        run_config=RunConfig(
            name=f"{cfg.dataset}-{cfg.model}-seed{seeds}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
            storage_path=cfg.storage_path if "://" in cfg.storage_path else str(Path(cfg.storage_path).resolve()),
            # The latest checkpoint is all a restart needs (it carries the best weights too).
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            logging_config=ray.LoggingConfig(log_level="WARNING"),  # the controller's INFO lines: log files only
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=list(callbacks),
        ),
    )
    return trainer.fit()


def resolve_locations(cfg: TrainConfig) -> None:
    """Absolute data paths (workers do not share the driver's working directory), checked to exist, and the
    tracking URI. Runs in the driver before Ray or MLflow start: a missing input is one line, never a worker's."""
    from erc import tracking

    config.check_inputs(cfg)
    cfg.tracking_uri = cfg.tracking_uri or tracking.tracking_uri()
    cfg.prepared = str(Path(cfg.prepared).resolve())
    cfg.feature_dirs = [str(Path(d).resolve()) for d in cfg.feature_dirs]


def start_run(cfg: TrainConfig, client, tags: dict | None = None) -> None:
    """Open `cfg`'s MLflow run: tags, every param, the software environment; sets `cfg.run_id`."""
    from erc import distributed, tracking

    prep_meta = json.loads((Path(cfg.prepared) / "meta.json").read_text())
    info = {m: canonical.feature_info(cfg.prepared, cfg.feature_dirs, name) for m, name in cfg.inputs.items()}
    run_tags = {
        "model": cfg.model, "dataset": cfg.dataset, "features": cfg.features_tag, "seed": str(cfg.seed),
        "git_commit": tracking.git_commit(), "data_sha256": json.dumps(prep_meta["sources"], sort_keys=True),
        "class_weights": json.dumps(cfg.class_weights) if not isinstance(cfg.class_weights, str) else cfg.class_weights,
        # the leaderboard flags rows whose inputs were learnt with labels, or whose leakage probe warned
        "label_derived": ",".join(sorted(m for m, i in info.items() if i.get("label_derived"))),
        "leakage_warning": ",".join(sorted(m for m, i in info.items() if (i.get("leakage_probe") or {}).get("warning"))),
        "mlflow.runName": f"{cfg.dataset}/{cfg.model}/seed{cfg.seed}", **(tags or {}),
    }
    cfg.run_id = client.create_run(tracking.experiment_id(cfg.experiment, cfg.tracking_uri), tags=run_tags).info.run_id
    params = tracking.flatten({k: v for k, v in asdict(cfg).items() if k not in ("run_id", "tracking_uri")})
    params.update({f"model_config.{k}": v for k, v in asdict(MODELS[cfg.model].Config(**cfg.model_config)).items()})
    params.update(distributed.describe(cfg, max(cfg.num_workers, 1)))  # local mode: one process
    tracking.log_params(client, cfg.run_id, params)
    tracking.log_environment(client, cfg.run_id)


def run_all(runs: list[TrainConfig], *, tags: dict | None = None, export_checkpoint=None,
            process_started: float | None = None) -> list[dict]:
    """The seeds of one configuration, tracked: one MLflow run each, trained in one Ray Train worker group.

    Each run holds its params, per-epoch validation metrics, and the test metrics of its selected checkpoint.
    `export_checkpoint`: a directory to receive the first run's selected checkpoint (a teacher for distillation).
    `process_started`: when the calling program started (its imports are then counted as start-up).
    """
    import mlflow

    from erc.progress import RunProgress

    clock = Clock()
    if process_started is not None:
        clock.add("process_start", time.time() - process_started)
    import_in_background("mlflow")  # seconds of imports, while Ray starts
    for cfg in runs:
        resolve_locations(cfg)
        cfg.run_id = None
    if any(cfg.num_workers for cfg in runs):
        with clock("ray_init"):
            init_ray()
    client = mlflow.MlflowClient(runs[0].tracking_uri)
    try:
        with clock("mlflow"):
            for cfg in runs:
                start_run(cfg, client, tags)
        for cfg in runs:
            client.log_batch(cfg.run_id, metrics=[_metric(f"time_driver_{k}_s", v) for k, v in clock.seconds.items()])
        with RunProgress(client, runs):
            result = fit(runs)
        if result.error:
            raise result.error
        results = []
        for cfg in runs:
            found = client.get_run(cfg.run_id)
            if found.info.status != "FINISHED":
                raise RuntimeError(f"run {cfg.run_id} ({cfg.dataset}/{cfg.model}/seed{cfg.seed}) did not finish")
            metrics = found.data.metrics
            results.append({"run_id": cfg.run_id, "seed": cfg.seed,
                            **{k: v for k, v in metrics.items() if k.startswith(("test_", "selected_"))}})
        if export_checkpoint:
            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # two small files
            with atomic_path(export_checkpoint) as tmp, tempfile.TemporaryDirectory() as download:
                Path(tmp).mkdir()
                client.download_artifacts(runs[0].run_id, "checkpoint", download)
                for name in MODEL_FILES:
                    shutil.copy2(Path(download) / "checkpoint" / name, Path(tmp) / name)
        return results
    except BaseException:
        for cfg in runs:
            if cfg.run_id and client.get_run(cfg.run_id).info.status != "FINISHED":
                client.set_terminated(cfg.run_id, "FAILED")
        raise


def run(cfg: TrainConfig, *, tags: dict | None = None, export_checkpoint=None) -> dict:
    """One seed, tracked (see `run_all`)."""
    (result,) = run_all([cfg], tags=tags, export_checkpoint=export_checkpoint)
    return result
