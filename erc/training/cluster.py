"""The Ray that training runs on: a cluster named by RAY_ADDRESS, else a local one of this process's own, and
how many workers with what resources (`scaling_config`). Stage 1 (`erc.training.finetune`) uses it too.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile
import time
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
        # the pointer file written below), not another erc run's or a test session's. Removed when this process
        # ends; one left by a process that died (kill -9) is removed by the next start.
        if "RAY_TMPDIR" not in os.environ:
            remove_stale_tmpdirs()
            os.environ["RAY_TMPDIR"] = own = tempfile.mkdtemp(prefix=f"{TMPDIR_PREFIX}{os.getpid()}-", dir=TMP_PARENT)
            atexit.register(_shutdown_and_remove, own)  # after Ray's own exit handlers (registered later)
        # Ray Train's spot-instance preemption watcher has nothing to watch here, and prints an error line per run.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Ray enables token auth on a new local cluster (a token made in ~/.ray if missing) and warns that it did
        # at every start: 18 lines in one quick `dvc exp run`, about nothing a user has to act on.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # Loopback only. `_node_ip_address="127.0.0.1"` alone is turned back into the machine's address
        # (ray._private.services.resolve_ip_for_localhost), and the GCS, raylet, workers and agents then listen on
        # every interface. Ray keeps a node on 127.0.0.1 only where it believes it cannot form a cluster
        # (services.get_node_ip_address: `if not ray_constants.ENABLE_RAY_CLUSTER`), and every component binds the
        # node's address. The constant is read at import (ray may be imported already); Ray's own Python processes
        # read the variable.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
        # The dashboard stays on: Ray's state API (Ray Train's placement-group cleaner, Tune) needs it.
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), _node_ip_address="127.0.0.1",
                 dashboard_host="127.0.0.1", **quiet)
        # ...and its pointer file names it: without one, a Ray process that looks for the cluster (Ray Train's
        # placement-group cleaner) picks among every Ray on the machine and fails when there are several.
        ray._private.utils.write_ray_address(ray._private.worker._global_node.gcs_address)
    logging.getLogger("ray").setLevel(logging.WARNING)
    print(f"ray logs: {ray_log_dir()}", file=sys.stderr)


TMPDIR_PREFIX = "erc-ray-"  # erc-ray-<pid of the process that started it>-<random>
TMP_PARENT = "/tmp" if os.path.isdir("/tmp") else None  # short: Ray's socket paths must fit in 107 characters


def _shutdown_and_remove(folder: str) -> None:
    import ray

    ray.shutdown()  # its processes gone first (done already at exit): they write logs and sockets there until then
    shutil.rmtree(folder, ignore_errors=True)


def remove_stale_tmpdirs() -> None:
    """Remove the local Ray folders of processes that are gone (killed, not ended). The pid in a folder's name says
    whose it is; one named before erc put it there is stale when no running process names it on its command line."""
    import psutil

    folders = list(Path(tempfile.gettempdir() if TMP_PARENT is None else TMP_PARENT).glob(TMPDIR_PREFIX + "*"))
    if not folders:
        return
    in_use = set()
    for process in psutil.process_iter(["cmdline"]):
        in_use.update(arg for arg in process.info["cmdline"] or () if TMPDIR_PREFIX in arg)
    in_use = " ".join(in_use)
    for folder in folders:
        owner = folder.name[len(TMPDIR_PREFIX):].split("-")[0]
        try:
            alive = psutil.pid_exists(int(owner)) if owner.isdigit() else time.time() - folder.stat().st_mtime < 600
        except OSError:  # removed meanwhile by another erc process
            continue
        if not alive and str(folder) not in in_use:  # (a legacy folder of under 10 minutes may be just made)
            shutil.rmtree(folder, ignore_errors=True)


def start_ray(num_workers: int, use_gpu: bool, *, needed: bool | None = None) -> None:
    """Start or join Ray where a run needs it (`needed`, default: it has workers), once the GPUs that it asks for
    are found: this machine's before a local Ray starts, a cluster's once it is joined."""
    needed = num_workers > 0 if needed is None else needed
    joins = needed and bool(os.environ.get("RAY_ADDRESS"))
    if not joins:
        check_gpus(num_workers, use_gpu)
    if needed:
        init_ray()
    if joins:
        check_gpus(num_workers, use_gpu)


def check_gpus(num_workers: int, use_gpu: bool) -> None:
    """`train.use_gpu` asks for a GPU per worker (one in local mode, num_workers 0): one line before anything starts
    where they are missing, rather than a run on CPU (local mode) or a worker group that waits for them forever.
    Local mode and a local Ray have this machine's GPUs (as torch sees them); a cluster's come from Ray, and from its
    autoscaler, which Ray Train waits for: then a line says so."""
    if not use_gpu:
        return
    import torch

    from erc.errors import ErcDataError

    wanted = max(num_workers, 1)
    fix = "set train.use_gpu=false"
    if not (num_workers and os.environ.get("RAY_ADDRESS")):
        have = torch.cuda.device_count()
        if have < wanted:
            where = "this machine (local mode)" if not num_workers else "this machine's local Ray"
            raise ErcDataError("train.use_gpu", f"true asks for {wanted} GPU(s), one per worker, and {where} has "
                                                f"{have}: {fix}, or run on a cluster with GPUs (RAY_ADDRESS)")
        return
    import ray

    have = int(ray.cluster_resources().get("GPU", 0))
    if have >= wanted:
        return
    most = ray._private.state.state.get_max_resources_from_cluster_config()  # None: no autoscaler
    can = int((most or {}).get("GPU", 0))
    if can < wanted:
        grow = f", and its autoscaler can add up to {can}" if most else " (no autoscaler to add more)"
        raise ErcDataError("train.use_gpu", f"true asks for {wanted} GPU(s), one per worker (train.num_workers), and "
                                            f"the Ray cluster has {have}{grow}: {fix}, or fewer train.num_workers")
    print(f"train.use_gpu: the Ray cluster has {have} of the {wanted} GPU(s) asked for; its autoscaler can add them "
          "and the run waits until it has (`ray status` shows the nodes; Ctrl-C stops it)", file=sys.stderr)


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
