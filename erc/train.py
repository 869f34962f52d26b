"""Training: one loop, run by Ray Train's TorchTrainer workers; selection on validation; test once.

`fit(cfg)` is the driver side: it opens the MLflow run, starts the TorchTrainer, takes the checkpoint
with the best validation weighted F1, evaluates it on the test split (the only time test data is read)
and closes the run. `train_loop_per_worker(cfg)` is the worker side: a plain epoch loop.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from erc.data import canonical
from erc.data.dialogues import IGNORE, DialogueData, deal, feature_stats, split_data
from erc.errors import ErcDataError
from erc.io import atomic_path
from erc.metrics import split_metrics
from erc.models import MODELS, ModelSpec, build_model

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
    class_weights: list | None = None
    grad_accum_steps: int = 1  # micro-batches per worker per optimizer step
    num_workers: int = 1
    cpus_per_worker: float | None = None  # None: the machine's CPUs shared evenly
    use_gpu: bool = False  # one GPU per worker
    placement_strategy: str = "PACK"  # Ray placement of the workers: PACK, SPREAD, STRICT_SPREAD, STRICT_PACK
    backend: str = "auto"  # ddp | deepspeed | auto (DeepSpeed on GPUs, DDP on CPU)
    precision: str = "auto"  # fp32 | bf16 | fp16 (deepspeed only) | auto (bf16 on GPUs, fp32 on CPU)
    zero_stage: int = 2  # DeepSpeed ZeRO stage (0-2: optimizer state and gradients partitioned)
    offload_optimizer: bool = False  # DeepSpeed: optimizer state in CPU memory (uses DeepSpeed's CPU Adam)
    max_failures: int = 2  # worker-group restarts from the latest checkpoint before the run fails
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


def configs_from_params(params: dict, dataset: str, model: str, *, source="params.yaml", seeds=None,
                        modalities=None, model_overrides: dict | None = None) -> list[TrainConfig]:
    """One TrainConfig per seed from params.yaml's `train`, `inputs.<dataset>` and `models.<model>` sections.

    Train settings apply in order: `train`, `train.per_model.<model>`, `train.per_dataset.<dataset>`,
    `train.per_model.<model>.per_dataset.<dataset>`. `modalities` keeps a subset of the dataset's inputs
    (a unimodal teacher); `model_overrides` adds config keys that the pipeline decides (a teacher checkpoint).
    """
    if model not in MODELS:
        raise ErcDataError(source, f"unknown model {model!r}; registered: {sorted(MODELS)}")
    if dataset not in params.get("inputs", {}):
        raise ErcDataError(source, f"no inputs.{dataset} entry (which feature set feeds which modality)")
    inputs = dict(params["inputs"][dataset])
    if modalities is not None:
        missing = set(modalities) - set(inputs)
        if missing:
            raise ErcDataError(source, f"inputs.{dataset} has no {sorted(missing)} modality")
        inputs = {m: inputs[m] for m in modalities}
    train = params["train"]
    per_model = dict((train.get("per_model") or {}).get(model) or {})
    per_model_dataset = (per_model.pop("per_dataset", None) or {}).get(dataset, {})
    shared = {k: v for k, v in train.items() if k not in ("seeds", "per_dataset", "per_model")}
    for overrides in (per_model, (train.get("per_dataset") or {}).get(dataset, {}), per_model_dataset):
        shared.update(overrides or {})
    model_config = {**(params.get("models", {}).get(model) or {}), **(model_overrides or {})}
    try:
        MODELS[model].Config(**model_config)
        data = params.get("data_dir", "data")  # a shared path on a cluster, so that every node sees it
        return [TrainConfig(dataset=dataset, prepared=f"{data}/prepared/{dataset}",
                            feature_dirs=[f"{data}/features/{dataset}"], inputs=inputs, model=model,
                            model_config=model_config, seed=seed, **shared)
                for seed in (seeds if seeds is not None else train["seeds"])]
    except TypeError as e:  # an unknown key in train or models.<model>
        raise ErcDataError(source, f"bad train/models.{model} params ({e})") from None


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
    spec = ModelSpec(
        input_dims={m: prep.features[n].dim for m, n in cfg.inputs.items()},
        num_classes=len(labels),
        num_sentiment_classes=len(prep.meta["sentiment_labels"]) if target == "emotion" else 0,
        has_score=bool(prep.meta.get("has_sentiment_score")),
        class_weights=cfg.class_weights,
    )
    return Task(prep, target, labels, data, spec, stats)


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


def load_checkpoint(directory):
    """The model saved by `save_checkpoint`, and its metadata (weights only: no code is unpickled)."""
    directory = Path(directory)
    info = json.loads((directory / "model.json").read_text())
    state = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
    model = build_model(info["model"], ModelSpec(**info["spec"]), info["model_config"])
    model.load_state_dict(state["state_dict"])
    return model.eval(), info


# ---------------------------------------------------------------- worker side


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Each epoch (and worker) starts from its own seed, so a run restored at an epoch boundary continues
    exactly as the uninterrupted run would have."""
    return (seed * 1_000_003 + epoch * 1009 + rank) % 2**32


def selection_score(val_score: float, epoch: int) -> float:
    """Ray ranks checkpoints by one number and prefers the later of equal ones; selection prefers the first
    best epoch, so equal scores are separated by a tie-break far below any real difference in F1."""
    return val_score - 1e-9 * epoch


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


def train_loop_per_worker(config: dict) -> None:
    import ray
    import ray.train

    from erc import distributed

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one line per checkpoint is noise here
    cfg = TrainConfig(**config)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if cfg.cpus_per_worker:
        torch.set_num_threads(max(1, round(cfg.cpus_per_worker)))
    seed_everything(cfg.seed)
    task = load_task(cfg)
    train, valid = task.splits["train"], task.splits["valid"]
    valid_part = valid.subset(range(rank, len(valid), world))
    model = build_model(cfg.model, task.spec, cfg.model_config)
    state = {"epoch": -1, "best": -1.0, "since_best": 0, "restored_from": []}
    restored = ray.train.get_checkpoint()
    if restored:  # a restarted worker group: weights before wrapping, the rest after
        with restored.as_directory() as directory:
            model.load_state_dict(torch.load(Path(directory) / "model.pt", weights_only=True)["state_dict"])
            state = json.loads((Path(directory) / "trainer_state.json").read_text())
            stepper = distributed.stepper(cfg, model, world)
            stepper.load(Path(directory))
        state["restored_from"] = state["restored_from"] + [state["epoch"]]
    else:
        stepper = distributed.stepper(cfg, model, world)

    client = None
    nodes = distributed.gather(ray.get_runtime_context().get_node_id())
    if rank == 0 and cfg.run_id:
        import mlflow

        client = mlflow.MlflowClient(cfg.tracking_uri)
        client.set_tag(cfg.run_id, "ray_nodes", str(len(set(nodes))))
        if restored:
            client.log_metric(cfg.run_id, "restored_from_epoch", state["epoch"], step=len(state["restored_from"]))

    for epoch in range(state["epoch"] + 1, cfg.epochs):
        seed_everything(epoch_seed(cfg.seed, epoch, rank))
        stepper.module.train()
        start = time.perf_counter()
        done = train_epoch(stepper, train, cfg, epoch, rank, world)
        seconds = time.perf_counter() - start
        gathered = distributed.gather({"train": done, "valid": predict(stepper.module, valid_part, device=stepper.device,
                                                                      float_dtype=stepper.input_dtype)})
        metrics, _, _ = score(merge_predictions([g["valid"] for g in gathered]), task, prefix="val_")
        losses = {}
        for g in gathered:
            for k, v in g["train"]["losses"].items():
                losses[k] = losses.get(k, 0.0) + v
        metrics.update({f"train_loss_{k}": v / max(done["steps"], 1) for k, v in losses.items()})
        utterances = sum(g["train"]["utterances"] for g in gathered)
        metrics.update({"epoch": epoch, "train_utterances_per_s": utterances / max(seconds, 1e-9)})
        if metrics[SELECT] > state["best"]:
            state.update(best=metrics[SELECT], since_best=0)
        else:
            state["since_best"] += 1
        state["epoch"] = epoch
        metrics["best_" + SELECT] = state["best"]
        metrics["selection_score"] = selection_score(metrics[SELECT], epoch)
        if client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            client.log_batch(cfg.run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items()])
        # Every epoch is checkpointed: the latest one restores a failed run, the best one is evaluated.
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                save_checkpoint(tmp, stepper.module, cfg, task, epoch, metrics)
                (Path(tmp) / "trainer_state.json").write_text(json.dumps(state))
            stepper.save(Path(tmp), rank)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        if state["since_best"] >= cfg.patience:
            break


# ---------------------------------------------------------------- driver side


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (`ray job submit` sets it), else start a local Ray on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
    # Ray Train's controller takes one report per health check (2 s by default) and a worker's report waits
    # for it: with a report every epoch that was 2 s an epoch. Ray processes inherit this from the driver.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(configure_logging=False)
    else:
        # The dashboard stays on: Ray's state API (used by Train and Tune to clean up) needs it.
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), configure_logging=False,
                 _node_ip_address="127.0.0.1")


def fit(cfg: TrainConfig, callbacks=()):
    """Train with Ray Train and return the Ray result (its best checkpoint is the validation-selected one)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if cfg.batch_size < cfg.num_workers * cfg.grad_accum_steps:
        raise ValueError(f"batch_size {cfg.batch_size} is smaller than num_workers x grad_accum_steps")
    cfg.cpus_per_worker = cfg.cpus_per_worker or max(1, (os.cpu_count() or 1) // cfg.num_workers)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=asdict(cfg),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
                                     placement_strategy=cfg.placement_strategy),
        run_config=RunConfig(
            name=f"{cfg.dataset}-{cfg.model}-seed{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
            storage_path=cfg.storage_path if "://" in cfg.storage_path else str(Path(cfg.storage_path).resolve()),
            # The best checkpoint and the latest (which Ray always keeps) are all a run needs.
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="selection_score",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=list(callbacks),
        ),
    )
    return trainer.fit()


def resolve_locations(cfg: TrainConfig) -> None:
    """Absolute data paths (workers do not share the driver's working directory) and the tracking URI."""
    from erc import tracking

    cfg.tracking_uri = cfg.tracking_uri or tracking.tracking_uri()
    cfg.prepared = str(Path(cfg.prepared).resolve())
    cfg.feature_dirs = [str(Path(d).resolve()) for d in cfg.feature_dirs]


def run(cfg: TrainConfig, *, tags: dict | None = None, export_checkpoint=None) -> dict:
    """One seed, tracked: MLflow run with params, per-epoch validation, test metrics of the selected checkpoint.

    `export_checkpoint`: a directory to receive a copy of the selected checkpoint (a teacher for distillation).
    """
    import mlflow

    from erc import distributed, tracking

    resolve_locations(cfg)
    client = mlflow.MlflowClient(cfg.tracking_uri)
    prep_meta = json.loads((Path(cfg.prepared) / "meta.json").read_text())
    run_tags = {
        "model": cfg.model, "dataset": cfg.dataset, "features": cfg.features_tag, "seed": str(cfg.seed),
        "git_commit": tracking.git_commit(), "data_sha256": json.dumps(prep_meta["sources"], sort_keys=True),
        "mlflow.runName": f"{cfg.dataset}/{cfg.model}/seed{cfg.seed}", **(tags or {}),
    }
    mlrun = client.create_run(tracking.experiment_id(cfg.experiment, cfg.tracking_uri), tags=run_tags)
    cfg.run_id = mlrun.info.run_id
    try:
        params = tracking.flatten({k: v for k, v in asdict(cfg).items() if k not in ("run_id", "tracking_uri")})
        params.update({f"model_config.{k}": v for k, v in asdict(MODELS[cfg.model].Config(**cfg.model_config)).items()})
        params.update(distributed.describe(cfg, cfg.num_workers))
        for key, value in params.items():
            client.log_param(cfg.run_id, key, str(value)[:6000])

        seed_everything(cfg.seed)
        result = fit(cfg)
        if result.error:
            raise result.error
        best = result.get_best_checkpoint(metric="selection_score", mode="max")
        with best.as_directory() as ckpt_dir:
            model, info = load_checkpoint(ckpt_dir)
            task = load_task(cfg, splits=("test",))
            test, cm, pred = evaluate(model, task.splits["test"], task, prefix="test_")  # the one look at test
            # The model alone: optimizer state and DeepSpeed partitions only matter to a restarting run.
            for name in MODEL_FILES:
                client.log_artifact(cfg.run_id, str(Path(ckpt_dir) / name), "checkpoint")
            if export_checkpoint:
                with atomic_path(export_checkpoint) as tmp:
                    Path(tmp).mkdir()
                    for name in MODEL_FILES:
                        shutil.copy2(Path(ckpt_dir) / name, Path(tmp) / name)
        tracking.log_predictions(client, cfg.run_id, task, pred)
        test["selected_epoch"] = info["epoch"]
        test["selected_" + SELECT] = info["metrics"][SELECT]
        for k, v in test.items():
            client.log_metric(cfg.run_id, k, float(v))
        tracking.log_confusion(client, cfg.run_id, cm, task.labels,
                               f"{cfg.dataset} {cfg.model} seed {cfg.seed}: test (epoch {info['epoch']})")
        client.set_terminated(cfg.run_id, "FINISHED")
        return {"run_id": cfg.run_id, "seed": cfg.seed, **test}
    except BaseException:
        client.set_terminated(cfg.run_id, "FAILED")
        raise
