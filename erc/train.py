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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from erc.data import canonical
from erc.data.dialogues import IGNORE, DialogueData, feature_stats, split_data
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
    num_workers: int = 1
    cpus_per_worker: int | None = None  # None: the machine's CPUs shared evenly
    use_gpu: bool = False
    storage_path: str = "ray_results"
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
        return [TrainConfig(dataset=dataset, prepared=f"data/prepared/{dataset}",
                            feature_dirs=[f"data/features/{dataset}"], inputs=inputs, model=model,
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
def predict(model, data: DialogueData, batch_size: int = 32) -> dict[str, np.ndarray]:
    """Predictions for every labelled utterance of `data`, in table-row order."""
    model.eval()
    rows, true, pred, score_true, score_pred = [], [], [], [], []
    for batch in data.batches(batch_size):
        out = model(batch)
        keep = batch.labels != IGNORE
        rows.append(batch.rows[keep].numpy())
        true.append(batch.labels[keep].numpy())
        pred.append(out.logits.argmax(-1)[keep].numpy())
        if out.score is not None:
            score_true.append(batch.score[keep].numpy())
            score_pred.append(out.score[keep].float().numpy())
    result = {"rows": np.concatenate(rows), "true": np.concatenate(true), "pred": np.concatenate(pred)}
    if score_pred:
        result["score_true"], result["score_pred"] = np.concatenate(score_true), np.concatenate(score_pred)
    order = np.argsort(result["rows"])
    return {k: v[order] for k, v in result.items()}


def evaluate(model, data: DialogueData, task: Task, prefix: str) -> tuple[dict, np.ndarray, dict]:
    """Metrics, confusion matrix and the predictions themselves, over the whole split."""
    p = predict(model, data)
    metrics, cm = split_metrics(p["true"], p["pred"], task.labels, target=task.target,
                                score_true=p.get("score_true"), score_pred=p.get("score_pred"), prefix=prefix)
    return metrics, cm, p


# ---------------------------------------------------------------- checkpoints


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


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one line per checkpoint is noise here
    cfg = TrainConfig(**config)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if cfg.cpus_per_worker:
        torch.set_num_threads(cfg.cpus_per_worker)
    seed_everything(cfg.seed)
    task = load_task(cfg)
    model = build_model(cfg.model, task.spec, cfg.model_config)
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_worker = max(1, cfg.batch_size // world)

    client = None
    if rank == 0 and cfg.run_id:
        import mlflow

        client = mlflow.MlflowClient(cfg.tracking_uri)

    best, since_best = -1.0, 0
    for epoch in range(cfg.epochs):
        model.train()
        start, seen, loss_sum, steps = time.perf_counter(), 0, {}, 0
        for batch in task.splits["train"].batches(per_worker, shuffle=True, seed=cfg.seed * 1000 + epoch,
                                                  shard=(rank, world)):
            out = model(batch)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            seen += batch.num_utterances
            steps += 1
            for k, v in out.losses.items():
                loss_sum[k] = loss_sum.get(k, 0.0) + float(v.detach())
        seconds = time.perf_counter() - start
        metrics, _, _ = evaluate(core, task.splits["valid"], task, prefix="val_")
        metrics.update({f"train_loss_{k}": v / max(steps, 1) for k, v in loss_sum.items()})
        metrics.update({"epoch": epoch, "train_utterances_per_s": seen * world / max(seconds, 1e-9)})
        improved = metrics[SELECT] > best
        best, since_best = (metrics[SELECT], 0) if improved else (best, since_best + 1)
        metrics["best_" + SELECT] = best
        if client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            client.log_batch(cfg.run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items()])
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            # Checkpoint only on a strict improvement: Ray ranks equal scores latest-first and drops the
            # oldest, so checkpointing every epoch would select a later epoch among ties, not the first best.
            if rank == 0 and improved:
                save_checkpoint(tmp, core, cfg, task, epoch, metrics)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
        if since_best >= cfg.patience:
            break


# ---------------------------------------------------------------- driver side


def init_ray(num_cpus: int | None = None) -> None:
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
        # The dashboard stays on: Ray's state API (used by Train and Tune to clean up) needs it.
        ray.init(num_cpus=num_cpus or os.cpu_count(), configure_logging=False, _node_ip_address="127.0.0.1")


def fit(cfg: TrainConfig):
    """Train with Ray Train and return the Ray result (its best checkpoint is the validation-selected one)."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cpus = cfg.cpus_per_worker or max(1, (os.cpu_count() or 1) // cfg.num_workers)
    cfg.cpus_per_worker = cpus
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=asdict(cfg),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(
            name=f"{cfg.dataset}-{cfg.model}-seed{cfg.seed}-{int(time.time())}",
            storage_path=str(Path(cfg.storage_path).resolve()),
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=SELECT,
                                               checkpoint_score_order="max"),
        ),
    )
    return trainer.fit()


def run(cfg: TrainConfig, *, tags: dict | None = None, export_checkpoint=None) -> dict:
    """One seed, tracked: MLflow run with params, per-epoch validation, test metrics of the selected checkpoint.

    `export_checkpoint`: a directory to receive a copy of the selected checkpoint (a teacher for distillation).
    """
    import mlflow

    from erc import tracking

    cfg.tracking_uri = cfg.tracking_uri or tracking.tracking_uri()
    # Workers do not share the driver's working directory.
    cfg.prepared = str(Path(cfg.prepared).resolve())
    cfg.feature_dirs = [str(Path(d).resolve()) for d in cfg.feature_dirs]
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
        for key, value in params.items():
            client.log_param(cfg.run_id, key, str(value)[:6000])

        seed_everything(cfg.seed)
        result = fit(cfg)
        if result.error:
            raise result.error
        best = result.get_best_checkpoint(metric=SELECT, mode="max")
        with best.as_directory() as ckpt_dir:
            model, info = load_checkpoint(ckpt_dir)
            task = load_task(cfg, splits=("test",))
            test, cm, pred = evaluate(model, task.splits["test"], task, prefix="test_")  # the one look at test
            client.log_artifacts(cfg.run_id, ckpt_dir, "checkpoint")
            if export_checkpoint:
                with atomic_path(export_checkpoint) as tmp:
                    shutil.copytree(ckpt_dir, tmp)
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
