"""The Ray that training runs on: a cluster named by RAY_ADDRESS, else a local one of this process's own, and
how many workers with what resources (`scaling_config`). Stage 1 (`erc.training.finetune`) uses it too.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path


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
