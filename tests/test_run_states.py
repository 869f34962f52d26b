"""What MLflow says of runs that did not end by themselves, and of runs asking for what the machine does not have.

Ctrl-C or SIGTERM during training ends the runs KILLED with one line (no traceback); a run left RUNNING by a process
that is gone (`kill -9`) is marked KILLED by the next erc command that opens the store; `train.use_gpu` without a GPU
is one line before any run exists; precision `auto` follows the device the run has, and the run records it.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from erc import tracking
from erc.errors import ErcDataError
from erc.training.config import TrainConfig
from erc.training.driver import run
from tests.fixtures import INPUTS

ROOT = Path(__file__).resolve().parent.parent

PROGRAM = """
import sys
from erc.training.config import TrainConfig
from erc.training.driver import run
from tests.fixtures import INPUTS

prepared, storage, uri = sys.argv[1:4]
run(TrainConfig(dataset="tiny", prepared=prepared, inputs=dict(INPUTS), model_config={"hidden": 16}, epochs=100000,
                patience=100000, batch_size=2, storage_path=storage, tracking_uri=uri, experiment="erc-test"))
"""


def config(prepared, tmp, uri, **overrides) -> TrainConfig:
    base = dict(dataset="tiny", prepared=str(prepared), inputs=dict(INPUTS), model_config={"hidden": 16}, epochs=1,
                batch_size=2, storage_path=str(tmp / "ray"), tracking_uri=uri, experiment="erc-test")
    return TrainConfig(**{**base, **overrides})


def all_runs(uri: str) -> list:
    client = mlflow.MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments) if experiments else []


def interrupt(tiny_emotion, tmp_path, signum) -> tuple[subprocess.CompletedProcess, object]:
    """A training (local mode: the loop in the program itself) stopped by `signum` once its run has an epoch."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    program = subprocess.Popen([sys.executable, "-c", PROGRAM, str(tiny_emotion), str(tmp_path / "ray"), uri],
                               cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)  # its own process group, as a terminal's command is
    client = mlflow.MlflowClient(uri)
    deadline = time.time() + 120
    while time.time() < deadline and program.poll() is None:
        found = all_runs(uri) if (tmp_path / "mlflow.db").exists() else []
        if found and client.get_metric_history(found[0].info.run_id, "val_wf1"):
            break
        time.sleep(0.5)
    assert program.poll() is None, program.communicate()[1]
    os.killpg(program.pid, signum)  # Ctrl-C reaches the whole group
    out, err = program.communicate(timeout=120)
    (found,) = all_runs(uri)
    return subprocess.CompletedProcess(program.args, program.returncode, out, err), found


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_training_ends_its_run_killed_with_one_line(tiny_emotion, tmp_path, signum):
    done, found = interrupt(tiny_emotion, tmp_path, signum)
    assert found.info.status == "KILLED", done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: tiny/baseline/seed0") and found.info.run_id in last
    assert done.returncode == 128 + signum
    tags = found.data.tags
    assert tags["driver_host"] == socket.gethostname() and tags["driver_pid"] == str(done_pid(tags))
    assert found.data.params["precision"] == "fp32"  # auto, on the CPU this run had


def done_pid(tags) -> int:
    pid = int(tags["driver_pid"])
    assert not psutil_alive(pid)  # the program that opened the run, now ended
    return pid


def psutil_alive(pid: int) -> bool:
    import psutil

    return psutil.pid_exists(pid)


def test_runs_left_running_by_a_gone_process_are_marked_killed_by_the_next_command(tmp_path):
    import psutil

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("erc-test", artifact_location=(tmp_path / "mlruns").as_uri())
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host, me = socket.gethostname(), os.getpid()
    started = int(psutil.Process(me).create_time() * 1000)

    def opened(pid, host=host, start=started + 5000, tags=True):
        owner = {"driver_host": host, "driver_pid": str(pid)} if tags else {}
        return client.create_run(experiment, start_time=start, tags=owner).info.run_id

    dead = opened(gone.pid)  # kill -9: its process is gone
    taken = opened(me, start=started - 60_000)  # its pid now belongs to a process started after the run
    mine = opened(me)  # a live run of this process
    elsewhere = opened(gone.pid, host=host + "-elsewhere")  # another machine's: not ours to judge
    untagged = opened(gone.pid, tags=False)  # made before erc recorded its owner
    tracking.experiment_id("erc", uri)  # what every erc command that creates runs does first
    status = {run_id: client.get_run(run_id).info.status for run_id in (dead, taken, mine, elsewhere, untagged)}
    assert status == {dead: "KILLED", taken: "KILLED", mine: "RUNNING", elsewhere: "RUNNING", untagged: "RUNNING"}
    assert str(gone.pid) in client.get_run(dead).data.tags["killed_by"]


def test_use_gpu_without_a_gpu_is_one_line_before_any_run(tiny_emotion, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(ErcDataError, match=r"^train\.use_gpu: true asks for 1 GPU\(s\).* has 0: set train\.use_gpu"):
        run(config(tiny_emotion, tmp_path, uri, use_gpu=True, num_workers=0))
    assert all_runs(uri) == []


def test_precision_auto_follows_the_device_and_the_flag():
    import torch

    from erc.training.distributed import DDPStepper, precision

    cfg = TrainConfig(dataset="x", prepared="x", inputs={}, use_gpu=True, precision="auto")
    assert precision(cfg, torch.device("cpu")) == "fp32"
    assert precision(cfg, torch.device("cuda", 0)) == "bf16"
    # local mode takes a GPU whatever the flag: default params (use_gpu false) stay fp32 there
    assert precision(TrainConfig(dataset="x", prepared="x", inputs={}, precision="auto"), "cuda") == "fp32"
    stepper = DDPStepper(cfg, torch.nn.Linear(2, 2), 1, torch.device("cpu"))
    assert stepper.dtype is None and stepper.precision == "fp32"  # no bf16 autocast on a CPU
