"""The training loop, run by each Ray Train worker (or in this process in local mode, or in a search's trial).

`train_runs` trains the seeds of one stage one after another: the data is loaded once, then per seed
`train_one`: an epoch (`train_epoch`) at a time, validation weighted F1 after each, the best weights kept, a
checkpoint every few epochs, early stopping; then, on rank 0, `finish_run`: the one look at test, with the
selected weights, recorded in the seed's MLflow run. Under the paper protocol (erc.training.config.PROTOCOLS) test
takes validation's place every epoch, there is no early stopping, and the last epoch's figures are kept beside.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from erc import tracking
from erc.data.dialogues import DialogueData, deal
from erc.models import build_model
from erc.models.checkpoint import MODEL_FILES, save_checkpoint
from erc.training import distributed
from erc.training.clock import Clock, import_in_background
from erc.training.cluster import quiet_console
from erc.training.config import SELECT, TrainConfig
from erc.training.sessions import RayTrainSession
from erc.training.task import Task, load_task, load_task_cached, merge_predictions, predict, score


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

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
    rank, world = session.rank, session.world
    # The split scored every epoch: validation, or test under the paper protocol (its official code's way; logged as
    # epoch_test_*, since MLflow's value of a metric is its last step's and test_* is the selected epoch's).
    watched, prefix = ("test", "epoch_test_") if cfg.protocol == "paper" else ("valid", "val_")
    select = prefix + "wf1"
    train, watch = task.splits["train"], task.splits[watched]
    watch_part = watch.subset(range(rank, len(watch), world))
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
            client.set_tag(cfg.run_id, "worker_pid", str(os.getpid()))  # a stage's seeds share it (parallel_seeds: 1)
            # what this worker does on the device it has (precision auto follows the device, not use_gpu)
            tracking.log_params(client, cfg.run_id, distributed.in_use(stepper))
            if state["restored_from"]:
                client.log_metric(cfg.run_id, "restored_from_epoch", state["epoch"], step=len(state["restored_from"]))

    def checkpoint(metrics: dict) -> None:
        with clock("checkpoint"), tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                checkpoint_files(tmp, stepper.module, cfg, task, state["epoch"], metrics)
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
        with clock(watched):
            gathered = distributed.gather({"train": done, "watch": predict(
                stepper.module, watch_part, device=stepper.device, float_dtype=stepper.input_dtype)})
            metrics, _, _ = score(merge_predictions([g["watch"] for g in gathered]), task, prefix=prefix)
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
        if metrics[select] > state["best"]:  # strictly better: the first best epoch is kept on ties
            state.update(best=metrics[select], best_epoch=epoch, since_best=0)
            best_weights = {k: v.detach().clone() for k, v in stepper.module.state_dict().items()}
        else:
            state["since_best"] += 1
        metrics["best_" + select] = state["best"]
        if client is not None:
            from mlflow.entities import Metric

            with clock("mlflow"):
                now = int(time.time() * 1000)
                client.log_batch(cfg.run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items()])
        stopping = epoch == cfg.epochs - 1 or (state["since_best"] >= cfg.patience and cfg.protocol != "paper")
        if session.checkpoints and not stopping and (epoch + 1) % max(cfg.checkpoint_every, 1) == 0:
            checkpoint(metrics)
        elif session.report_every_epoch:
            session.report(metrics, None)
        if stopping:
            break

    if not session.evaluate_test:  # a search's trial: its caller closes the run
        if client is not None:
            client.log_batch(cfg.run_id, metrics=[metric(k, v) for k, v in clock.metrics().items()])
        return
    if rank == 0:
        finish_run(cfg, task, stepper, best_weights, state, client, clock,
                   last={f"last_{k.removeprefix('epoch_')}": v for k, v in metrics.items() if k.startswith("epoch_test_")})
    state["seed_done"] = True  # a restarted worker group goes on with the next seed
    checkpoint(metrics)
    if client is not None:  # the phase times, the last checkpoint's included
        client.log_batch(cfg.run_id, metrics=[metric(k, v) for k, v in clock.metrics().items()])


def checkpoint_files(directory, model, cfg: TrainConfig, task: Task, epoch: int, metrics: dict) -> None:
    """`model` with what a restart, the report and `erc predict` read back (erc.models.checkpoint)."""
    save_checkpoint(directory, model, name=cfg.model, config=cfg.model_config, spec=task.spec, feature_stats=task.stats,
                    epoch=epoch, train_config=asdict(cfg), metrics=metrics)


def finish_run(cfg: TrainConfig, task: Task, stepper, best_weights: dict, state: dict, client, clock: Clock,
               last: dict) -> None:
    """The one look at test: the selected epoch's weights, evaluated and recorded with the run.

    Under the paper protocol the selected weights are the best TEST epoch's (the official code's figure), the last
    epoch's test metrics (`last_test_*`, involving no selection) are recorded beside them, and the model is not
    registered: such a run never serves as a model of erc's."""
    paper = cfg.protocol == "paper"
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
    select = "epoch_test_wf1" if paper else SELECT
    test["selected_" + select] = state["best"]
    test.update(last)
    test.update(efficiency(selected, state, inference, len(task.splits["test"]), stepper.device))
    with clock("mlflow"), tempfile.TemporaryDirectory() as tmp:
        checkpoint_files(tmp, selected, cfg, task, state["best_epoch"], {select: state["best"]})
        for name in MODEL_FILES:
            client.log_artifact(cfg.run_id, str(Path(tmp) / name), "checkpoint")
        tracking.log_predictions(client, cfg.run_id, task, pred)
        tracking.log_confusion(client, cfg.run_id, cm, task.labels,
                               f"{cfg.dataset} {cfg.model} seed {cfg.seed}: test (epoch {state['best_epoch']})")
        if not (paper or cfg.paper_entry):  # the official settings are measured, never served as erc's model
            tracking.log_trained_model(client, cfg, task, tmp, test)  # datasets, logged model, registry
    client.log_batch(cfg.run_id, metrics=[metric(k, v) for k, v in test.items()])
    client.set_terminated(cfg.run_id, "FINISHED")

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

def metric(key: str, value: float, step: int = 0):
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), step)

def train_loop_per_worker(config: dict) -> None:
    """The TorchTrainer's worker function: the seeds of one stage in one worker group."""
    quiet_console()
    train_runs([TrainConfig(**c) for c in config["runs"]], RayTrainSession(config["evaluate_test"]),
               config["started_at"])
