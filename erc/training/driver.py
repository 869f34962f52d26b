"""The driver side of training: one MLflow run per seed, then all the seeds in one Ray Train worker group.

`run_all(configs)` checks the inputs (before Ray or MLflow start), opens one MLflow run per seed, trains them in
one TorchTrainer (`fit`: one worker group, the data loaded once per worker; 0 workers is Ray Train's local mode,
the loop in this process), and collects what the runs recorded. In local mode on CPU the seeds may instead train
side by side (`train.parallel_seeds`: `side_by_side`), a local-mode fit per process. The loop itself is
`erc.training.loop`.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

from erc import tracking
from erc.data import canonical
from erc.io import atomic_path
from erc.models import MODELS
from erc.models.checkpoint import MODEL_FILES
from erc.training import distributed
from erc.training.clock import Clock, import_in_background
from erc.training.cluster import scaling_config, start_ray
from erc.training.config import TrainConfig, check_inputs
from erc.training.loop import metric, train_loop_per_worker


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

def side_by_side(runs: list[TrainConfig]) -> int:
    """How many processes train the seeds side by side (`train.parallel_seeds`), and so each seed's threads
    (`cpus_per_worker`), both set in the configs, where the runs record them. Only in local mode on CPU: a worker
    group's CPUs are Ray's to share, and local mode has one GPU."""
    cfg, cpus = runs[0], os.cpu_count() or 1
    wanted = cfg.parallel_seeds
    if cfg.num_workers or cfg.use_gpu:
        wanted = 1
    elif wanted == "auto":  # cpus_per_worker null: the CPUs shared by the seeds, at least one thread each
        wanted = cpus // (cfg.cpus_per_worker or max(1, cpus // len(runs)))
    processes = max(1, min(int(wanted), len(runs)))
    for r in runs:
        r.parallel_seeds = processes
        r.cpus_per_worker = r.cpus_per_worker or max(1, cpus // (processes * max(r.num_workers, 1)))
    return processes


def fit_side_by_side(runs: list[TrainConfig], processes: int) -> None:
    """The runs dealt to `processes` processes (seed i to process i mod n), each a local-mode `fit` of its own.
    They share nothing but the MLflow store, so each seed has the numbers it has trained alone at its thread count.
    The first error is raised here, and leaving stops the other processes (the caller ends their runs)."""
    # spawn: a fresh interpreter, not a fork of this one with its threads (MLflow's, RunProgress's) and torch's pools.
    # The processes ignore Ctrl-C, which reaches the whole process group: the driver stops them, without a traceback.
    ignore_ctrl_c = functools.partial(signal.signal, signal.SIGINT, signal.SIG_IGN)
    with multiprocessing.get_context("spawn").Pool(processes, initializer=ignore_ctrl_c) as pool:
        pending = [pool.apply_async(fit_part, (runs[i::processes],)) for i in range(processes)]
        while pending:
            pending[0].wait(0.5)
            done = [p for p in pending if p.ready()]
            for p in done:
                p.get()
            pending = [p for p in pending if p not in done]


def fit_part(runs: list[TrainConfig]) -> None:
    """One side-by-side process's seeds."""
    result = fit(runs)
    if result.error:
        raise result.error


def resolve_locations(cfg: TrainConfig) -> None:
    """Absolute data paths (workers do not share the driver's working directory), checked to exist, and the
    tracking URI. Runs in the driver before Ray or MLflow start: a missing input is one line, never a worker's."""
    check_inputs(cfg)
    cfg.tracking_uri = cfg.tracking_uri or tracking.tracking_uri()
    cfg.prepared = str(Path(cfg.prepared).resolve())
    cfg.feature_dirs = [str(Path(d).resolve()) for d in cfg.feature_dirs]

def start_run(cfg: TrainConfig, client, tags: dict | None = None) -> None:
    """Open `cfg`'s MLflow run: tags, every param, the software environment; sets `cfg.run_id`."""
    prep_meta = json.loads((Path(cfg.prepared) / "meta.json").read_text())
    info = {m: canonical.feature_info(cfg.prepared, cfg.feature_dirs, name) for m, name in cfg.inputs.items()}
    run_tags = {
        "model": cfg.model, "dataset": cfg.dataset, "features": cfg.features_tag, "seed": str(cfg.seed),
        "git_commit": tracking.git_commit(), "data_sha256": json.dumps(prep_meta["sources"], sort_keys=True),
        "class_weights": json.dumps(cfg.class_weights) if not isinstance(cfg.class_weights, str) else cfg.class_weights,
        # the leaderboard flags rows whose inputs were learnt with labels, or whose leakage probe warned
        "label_derived": ",".join(sorted(m for m, i in info.items() if i.get("label_derived"))),
        "leakage_warning": ",".join(sorted(m for m, i in info.items() if (i.get("leakage_probe") or {}).get("warning"))),
        "protocol": cfg.protocol,  # paper: test-selected, kept off the leaderboard and the registry
        "paper_entry": str(cfg.paper_entry).lower(),  # the official code's configuration (params' paper section)
        "mlflow.runName": f"{cfg.dataset}/{cfg.model}/seed{cfg.seed}", **tracking.owner_tags(), **(tags or {}),
    }
    cfg.run_id = client.create_run(tracking.experiment_id(cfg.experiment, cfg.tracking_uri), tags=run_tags).info.run_id
    # precision: the one in use, which the worker records (`auto` follows the device it has)
    params = tracking.flatten({k: v for k, v in asdict(cfg).items() if k not in ("run_id", "tracking_uri", "precision")})
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

    from erc.training.progress import RunProgress

    clock = Clock()
    if process_started is not None:
        clock.add("process_start", time.time() - process_started)
    import_in_background("mlflow")  # seconds of imports, while Ray starts
    for cfg in runs:
        resolve_locations(cfg)
        cfg.run_id = None
    first = runs[0]
    processes = side_by_side(runs)
    with clock("ray_init") if first.num_workers else nullcontext():
        start_ray(first.num_workers, first.use_gpu)
    client = mlflow.MlflowClient(first.tracking_uri)
    previous = on_sigterm(Terminated.raise_)  # after Ray's start, which sets its own
    try:
        with clock("mlflow"):
            for cfg in runs:
                start_run(cfg, client, tags)
        for cfg in runs:
            client.log_batch(cfg.run_id, metrics=[metric(f"time_driver_{k}_s", v) for k, v in clock.seconds.items()])
        with RunProgress(client, runs):
            if processes > 1:
                fit_side_by_side(runs, processes)
            else:
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
                            **{k: v for k, v in metrics.items() if k.startswith(("test_", "selected_", "last_test_"))}})
        if export_checkpoint:
            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # two small files
            with atomic_path(export_checkpoint) as tmp, tempfile.TemporaryDirectory() as download:
                Path(tmp).mkdir()
                client.download_artifacts(runs[0].run_id, "checkpoint", download)
                for name in MODEL_FILES:
                    shutil.copy2(Path(download) / "checkpoint" / name, Path(tmp) / name)
        return results
    except (KeyboardInterrupt, SystemExit):
        # Ctrl-C, SIGTERM, or Ray Train's own Ctrl-C handler (it aborts the workers, then exits): killed, not failed.
        ended = end_runs(client, runs, "KILLED")
        print(f"interrupted: {', '.join(ended) or 'no run started'}"
              f"{' ended as KILLED' if ended else ''}", file=sys.stderr)
        raise SystemExit(128 + (signal.SIGTERM if Terminated.received else signal.SIGINT)) from None
    except BaseException:
        end_runs(client, runs, "FAILED")
        raise
    finally:
        on_sigterm(previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C is, so that the runs end as KILLED (Python's default ends the
    process at once, and leaves them RUNNING)."""

    received = False  # what the exit status says, whichever exception the signal ends up as (Ray's own, say)

    @classmethod
    def raise_(cls, signum, frame):
        cls.received = True
        raise cls()


def on_sigterm(handler):
    """Install `handler` for SIGTERM (from the main thread only, where Python allows it); returns the previous one."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def end_runs(client, runs: list[TrainConfig], status: str) -> list[str]:
    """End the runs that were opened and did not finish; returns their names."""
    ended = []
    for cfg in runs:
        if cfg.run_id and client.get_run(cfg.run_id).info.status not in ("FINISHED", status):
            client.set_terminated(cfg.run_id, status)
            ended.append(f"{cfg.dataset}/{cfg.model}/seed{cfg.seed} ({cfg.run_id})")
    return ended


def run(cfg: TrainConfig, *, tags: dict | None = None, export_checkpoint=None) -> dict:
    """One seed, tracked (see `run_all`)."""
    (result,) = run_all([cfg], tags=tags, export_checkpoint=export_checkpoint)
    return result
