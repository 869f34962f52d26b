"""`mlflow ui` on an erc store, opened in headless Chromium as a new user would: the runs page shows each run's
dataset and model without configuring anything. A real MLflow server on a real sqlite store; the run is recorded
by erc.tracking as the train stage records it (the model is not trained: only what MLflow shows is tested)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest

from erc import tracking
from erc.models import build_model
from erc.training.loop import checkpoint_files
from erc.training.config import TrainConfig
from erc.training.task import load_task
from tests.fixtures import INPUTS
from tests.test_report import chromium

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_emotion, tmp_path_factory):
    if shutil.which("chromium") is None:
        pytest.skip("needs chromium (Debian: chromium, chromium-driver)")
    root = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = tracking.experiment_id("erc", uri)
    cfg = TrainConfig(dataset="tiny", prepared=str(tiny_emotion), inputs=dict(INPUTS), model="mister_e",
                      model_config={"width": 16, "attn_dim": 12, "heads": 3, "gru_layers": 1, "cross_blocks": 1},
                      tracking_uri=uri)
    task = load_task(cfg)
    cfg.run_id = client.create_run(experiment, tags={"mlflow.runName": "tiny/mister_e/seed0"}).info.run_id
    (root / "checkpoint").mkdir()
    checkpoint_files(root / "checkpoint", build_model(cfg.model, task.spec, cfg.model_config), cfg, task, 0, {})
    tracking.log_trained_model(client, cfg, task, root / "checkpoint", {"test_wf1": 61.5, "test_acc": 62.0})
    client.set_terminated(cfg.run_id, "FINISHED")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Its own process group: the server's workers go with it at the end. No job runner (its consumers are
    # processes of their own, not needed to show runs).
    process = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host",
                                "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
                                    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # up to 5 minutes: minutes on a loaded 2-core machine
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not answer /health within 5 minutes")
        yield {"base": base, "experiment": experiment, "client": client}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def wait_for_text(driver, text: str, seconds: float = 60) -> str:
    from selenium.webdriver.common.by import By

    deadline = time.time() + seconds
    while time.time() < deadline:
        body = driver.find_element(By.TAG_NAME, "body").text
        if text in body:
            return body
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not on the page after {seconds} s; it shows: {body[:500]!r}")


def test_runs_page_shows_dataset_and_model(server):
    driver = chromium()
    try:
        driver.get(tracking.ui_url(server["experiment"], server["base"]))
        body = wait_for_text(driver, "tiny/mister_e/seed0")
        assert "Runs" in body and "Token Usage" not in body  # the runs, not the GenAI overview
        wait_for_text(driver, "erc-tiny-mister_e")  # the Models column: the run's logged model
        body = wait_for_text(driver, "tiny (")  # the Dataset column: name (digest) and split
        assert any(f"tiny ({tracking.dataset_digest({}, split, dict(INPUTS))})" in body
                   for split in ("train", "valid", "test"))
    finally:
        driver.quit()
