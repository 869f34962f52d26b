"""Ray Train at scale, on this machine: two workers on a two-node cluster, a killed worker, DeepSpeed on CPU.

The session's Ray is a real two-node cluster (`ray_session` in conftest). One medium generated dataset serves
every run here. A worker is killed as soon as Ray Train's controller has registered the checkpoint of the epoch
before (its snapshot file says so): the kill then lands inside the next epoch however fast an epoch has become.

Tolerance. With dropout off, one worker on a global batch and two workers on its dealt halves compute the
same gradient: each half's loss is weighted by its share of the batch's labelled utterances, and the all-reduce
averages. What differs is the order of float additions (two partial sums instead of one), about 1e-7 relative
per step. Over the runs here that stays below 1e-4 relative in the training loss, and it can flip a validation
prediction only where a logit margin is that small. So: training loss within 1e-4 relative, validation and test
weighted F1 within 0.5 points, and one flipped utterance of the validation split would already move F1 by more
than 0.5 (we measured the runs identical to 7 digits).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import pytest

from erc.training.config import TrainConfig
from erc.training.driver import run
from tests.fixtures import INPUTS, make_prepared

ROOT = Path(__file__).resolve().parent.parent
EPOCHS = 5
LOSS_RTOL, F1_ATOL = 1e-4, 0.5


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """800 training dialogues: an epoch takes about a second with two workers."""
    root = tmp_path_factory.mktemp("medium")
    prepared = make_prepared(root / "data" / "prepared" / "tiny", kind="emotion",
                             splits=(("train", 800), ("valid", 60), ("test", 20)), noise=6.0)
    return root, prepared


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def config(prepared, tmp, uri, **overrides) -> TrainConfig:
    base = dict(dataset="tiny", prepared=str(prepared), inputs=dict(INPUTS), model="baseline",
                model_config={"hidden": 32, "dropout": 0.0}, seed=0, epochs=EPOCHS, patience=EPOCHS, batch_size=8,
                lr=3e-3, storage_path=str(tmp / "ray"), tracking_uri=uri, experiment="erc-distributed",
                num_workers=1, cpus_per_worker=1)  # a worker group (not local mode): these tests are about Ray
    base.update(overrides)
    return TrainConfig(**base)


def history(client, run_id, key) -> dict[int, float]:
    """The metric per step; a step logged twice (a redone epoch) keeps its last value."""
    return {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)}


def one_and_two_workers_agree(client, one: str, two: str) -> None:
    f1_one, f1_two = history(client, one, "val_wf1"), history(client, two, "val_wf1")
    assert sorted(f1_one) == sorted(f1_two) == list(range(EPOCHS))
    for epoch in f1_one:
        assert f1_two[epoch] == pytest.approx(f1_one[epoch], abs=F1_ATOL), epoch
    loss_one, loss_two = history(client, one, "train_loss_ce"), history(client, two, "train_loss_ce")
    for epoch in loss_one:
        assert loss_two[epoch] == pytest.approx(loss_one[epoch], rel=LOSS_RTOL), epoch
    test_one, test_two = client.get_run(one).data.metrics, client.get_run(two).data.metrics
    assert test_two["test_wf1"] == pytest.approx(test_one["test_wf1"], abs=F1_ATOL)
    assert test_two["selected_epoch"] == test_one["selected_epoch"]


@pytest.fixture(scope="module")
def reference_runs(ray_session, medium, store, tmp_path_factory):
    """The same run with one worker, and with two workers placed on the cluster's two nodes."""
    tmp = tmp_path_factory.mktemp("reference")
    one = run(config(medium[1], tmp, store, num_workers=1))
    two = run(config(medium[1], tmp, store, num_workers=2, placement_strategy="STRICT_SPREAD"))
    return one["run_id"], two["run_id"]


def test_two_workers_on_two_nodes_match_one_worker(reference_runs, store):
    client = mlflow.MlflowClient(store)
    one, two = reference_runs
    assert client.get_run(one).data.tags["ray_nodes"] == "1"
    assert client.get_run(two).data.tags["ray_nodes"] == "2"
    assert client.get_run(two).data.params["world_size"] == "2"
    one_and_two_workers_agree(client, one, two)
    # The runs learnt something (the comparison is not between two untrained models).
    loss = history(client, two, "train_loss_ce")
    assert loss[EPOCHS - 1] < 0.8 * loss[0]


def alive_training_workers() -> list:
    from ray.util.state import list_actors

    return list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])


def registered_checkpoint(storage: str) -> tuple[int, int] | None:
    """(run index, epoch) of the checkpoint Ray Train's controller registered last under `storage`, None before
    the first. A worker killed now restarts from it (a checkpoint reported but not yet registered is lost)."""
    for snapshot in Path(storage).glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
            state = json.loads((snapshot.parent / latest["checkpoint_dir_name"] / "trainer_state.json").read_text())
        except (OSError, ValueError, KeyError, TypeError):  # not written yet, or being rewritten
            continue
        return state["run"], state["epoch"]
    return None


def kill_a_worker_during_epoch(storage: str, epoch: int, run_index: int = 0) -> dict:
    """Wait until the controller has registered the checkpoint of `epoch - 1` of the stage's run `run_index`, then
    SIGKILL one worker: it is then inside `epoch` (an epoch takes longer than the read). Returns the epoch of the
    checkpoint registered at the kill, the one the restart must resume from."""
    deadline = time.time() + 300
    while time.time() < deadline:
        registered = registered_checkpoint(storage)
        if registered is not None and registered >= (run_index, epoch - 1):
            break
        time.sleep(0.01)
    else:
        raise TimeoutError(f"the checkpoint of epoch {epoch - 1} was never registered")
    victim = alive_training_workers()[-1]
    os.kill(victim.pid, signal.SIGKILL)
    return {"pid": victim.pid, "registered": registered}


def test_killed_worker_restores_from_the_last_checkpoint(reference_runs, medium, store, tmp_path):
    client = mlflow.MlflowClient(store)
    experiment = "erc-distributed-kill"
    mlflow.MlflowClient(store).create_experiment(experiment)
    # A checkpoint every epoch, so that the restore is from the epoch before the kill.
    cfg = config(medium[1], tmp_path, store, num_workers=2, placement_strategy="STRICT_SPREAD", experiment=experiment,
                 checkpoint_every=1)
    outcome = {}
    trainer = threading.Thread(target=lambda: outcome.update(run(cfg)))
    trainer.start()
    killed = kill_a_worker_during_epoch(cfg.storage_path, epoch=2)
    trainer.join(timeout=600)
    assert outcome, "the run did not finish after the worker was killed"
    run_id = outcome["run_id"]

    assert client.get_run(run_id).info.status == "FINISHED"
    restored = client.get_metric_history(run_id, "restored_from_epoch")
    assert killed["registered"] == (0, 1), killed  # the kill came inside epoch 2
    assert [m.value for m in restored] == [1.0], f"expected one restore from epoch 1 ({killed})"
    epochs = [m.step for m in client.get_metric_history(run_id, "val_wf1")]
    assert sorted(set(epochs)) == list(range(EPOCHS))
    assert len(epochs) - EPOCHS <= 1, f"more than one epoch redone: {sorted(epochs)}"
    # Restored at an epoch boundary with the optimizer state, it continues exactly as the uninterrupted run.
    one_and_two_workers_agree(client, reference_runs[1], run_id)


def test_worker_killed_in_a_later_seed_resumes_that_seed(reference_runs, medium, store, tmp_path):
    """A stage's seeds share one worker group: a restart resumes the seed it was at, and the seeds already done
    are neither trained nor evaluated again."""
    from erc.training.driver import run_all

    client = mlflow.MlflowClient(store)
    experiment = "erc-distributed-kill-seeds"
    client.create_experiment(experiment)
    configs = [config(medium[1], tmp_path, store, experiment=experiment, checkpoint_every=1, seed=seed)
               for seed in (0, 1)]
    outcome = []
    trainer = threading.Thread(target=lambda: outcome.extend(run_all(configs)))
    trainer.start()
    killed = kill_a_worker_during_epoch(configs[0].storage_path, epoch=2, run_index=1)
    trainer.join(timeout=600)
    assert outcome, "the stage did not finish after the worker was killed"
    first, second = (r["run_id"] for r in outcome)
    assert killed["registered"] == (1, 1), killed  # the kill came inside seed 1's epoch 2
    assert [m.value for m in client.get_metric_history(second, "restored_from_epoch")] == [1.0], killed
    assert not client.get_metric_history(first, "restored_from_epoch")
    assert sorted(m.step for m in client.get_metric_history(first, "val_wf1")) == list(range(EPOCHS))
    # Seed 0 of the stage is the one-worker reference run; seed 1 matches its own uninterrupted run.
    assert client.get_run(first).data.metrics["test_wf1"] == client.get_run(reference_runs[0]).data.metrics["test_wf1"]
    alone = run(config(medium[1], tmp_path, store, seed=1))
    assert history(client, second, "val_wf1") == history(client, alone["run_id"], "val_wf1")
    assert outcome[1]["test_wf1"] == alone["test_wf1"]


def test_deepspeed_zero2_on_cpu_end_to_end(ray_session, medium, store, tmp_path):
    client = mlflow.MlflowClient(store)
    cfg = config(medium[1], tmp_path, store, model="sdt", model_config={"hidden": 32, "ff_dim": 32, "heads": 2},
                 epochs=2, patience=2, num_workers=2, backend="deepspeed", zero_stage=2)
    result = run(cfg)
    params = client.get_run(result["run_id"]).data.params
    assert params["backend"] == "deepspeed"
    assert json.loads(params["deepspeed_config"])["zero_optimization"]["stage"] == 2
    assert 0 < result["test_wf1"] <= 100
    assert len(history(client, result["run_id"], "val_wf1")) == 2
    # Each rank wrote its ZeRO partition of the optimizer state into the one Ray checkpoint.
    checkpoints = sorted(Path(cfg.storage_path).glob("*/checkpoint_*/deepspeed/state"))
    assert checkpoints and {p.name for p in checkpoints[-1].iterdir() if "optim_states" in p.name} == {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}


# ---------------------------------------------------------------- ray job submit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_lines(log: Path, n: int = 30) -> str:
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    return "\n".join(lines[-n:]) or "(no output)"


def wait_for_port(port: int, seconds: float, process: subprocess.Popen, log: Path) -> None:
    """Wait until `process` listens on `port`; if it exits first or never listens, fail with its own last lines."""
    name = " ".join(Path(word).name if i == 0 else word for i, word in enumerate(process.args[:3]))
    deadline = time.time() + seconds
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if process.poll() is not None:
            raise RuntimeError(f"`{name}` exited with {process.returncode} before listening on 127.0.0.1:{port}; "
                               f"its last lines ({log}):\n{last_lines(log)}")
        time.sleep(0.5)
    raise TimeoutError(f"`{name}`: nothing listens on 127.0.0.1:{port} after {seconds:.0f} s; "
                       f"its last lines ({log}):\n{last_lines(log)}")


def cluster_token(home: Path, ray: Path) -> str:
    """A fresh Ray auth token, made as the README makes one (`ray get-auth-token --generate`), in a home of its own:
    never one that an earlier run left in ~/.ray."""
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}  # else it echoes them
    made = subprocess.run([str(ray), "get-auth-token", "--generate"], env={**env, "HOME": str(home)},
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0 and made.stdout.strip(), made.stdout + made.stderr
    return made.stdout.strip()


@pytest.fixture
def head_and_tracking_server(tmp_path):
    """A Ray head (`ray start --head`) and an `mlflow server`, both on 127.0.0.1, stopped afterwards.

    Ray's token authentication is on, as on a real cluster. `ray start` does not make a token, so the fixture makes
    one and hands it to the head and to `ray job submit` in RAY_AUTH_TOKEN (which Ray reads before ~/.ray/auth_token).
    Each server's output goes to a log in tmp_path; a server that exits or never listens fails with its last lines."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = cluster_token(tmp_path / "token-home", bin_dir / "ray")
    gcs, dashboard, tracking = free_port(), free_port(), free_port()
    # Ports with fixed defaults get free ones: the test session's own Ray cluster already holds the defaults.
    fixed = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
             "--runtime-env-agent-port", "--ray-client-server-port"]
    head_log, server_log = tmp_path / "ray-head.log", tmp_path / "mlflow-server.log"
    with head_log.open("wb") as out:
        head = subprocess.Popen(
            [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             *[f"{flag}={free_port()}" for flag in fixed], "--disable-usage-stats"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    with server_log.open("wb") as out:
        server = subprocess.Popen(
            [str(bin_dir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(tracking),
             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
             "--artifacts-destination", str(tmp_path / "artifacts")],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    marker = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    previous = marker.read_text() if marker.is_file() else None  # `ray start` points it at its head
    try:
        wait_for_port(dashboard, 120, head, head_log)
        wait_for_port(tracking, 120, server, server_log)
        yield {"dashboard": f"http://127.0.0.1:{dashboard}", "tracking": f"http://127.0.0.1:{tracking}", "env": env}
    finally:
        for process in (head, server):
            try:  # the whole group: a head that failed may have left its raylet or GCS behind
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for process in (head, server):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:  # Ray drains its node for up to 30 s first
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        # Point Ray back at the session's cluster (see conftest.forget_cluster): a stale pointer to this dead head
        # made later Tune trials wait forever for CPUs.
        if previous is not None:
            marker.write_text(previous)
        else:
            marker.unlink(missing_ok=True)


def test_ray_job_submit_trains_and_logs_to_the_tracking_server(head_and_tracking_server, medium, tmp_path):
    cluster = head_and_tracking_server
    data_root, _ = medium
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({
        "data_dir": str(data_root / "data"), "inputs": {"tiny": INPUTS}, "models": {"baseline": {"hidden": 16}},
        "train": {"seeds": [7], "epochs": 2, "patience": 2, "batch_size": 8, "lr": 0.003, "num_workers": 1,
                  "storage_path": str(tmp_path / "ray"), "experiment": "erc-job"}}))
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": cluster["tracking"], "MLFLOW_DISABLE_TELEMETRY": "true"}}
    submitted = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", cluster["dashboard"],
         "--working-dir", str(ROOT), "--runtime-env-json", json.dumps(runtime_env), "--",
         "python", "pipelines/train.py", "--dataset", "tiny", "--model", "baseline", "--params", str(params),
         "--out", str(tmp_path / "runs.json")],
        env=cluster["env"], capture_output=True, text=True, timeout=600)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert "succeeded" in submitted.stdout

    client = mlflow.MlflowClient(cluster["tracking"])
    runs = client.search_runs([client.get_experiment_by_name("erc-job").experiment_id])
    assert len(runs) == 1
    found = runs[0]
    assert found.info.status == "FINISHED"
    assert found.data.tags["dataset"] == "tiny" and found.data.tags["seed"] == "7"
    assert "test_wf1" in found.data.metrics and len(client.get_metric_history(found.info.run_id, "val_wf1")) == 2
    assert "checkpoint/model.pt" in [a.path for a in client.list_artifacts(found.info.run_id, "checkpoint")]
