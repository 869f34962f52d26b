"""The report stage on real runs (a real local Ray, a real sqlite MLflow store), its page opened in headless Chromium."""

import io
import json
import os
import shutil
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from erc.evaluation import leaderboard, report
from erc.params import project_root
from erc.training.config import TrainConfig
from erc.training.driver import run_all
from tests.fixtures import INPUTS

MODELS = {"baseline": {"hidden": 16},
          "mister_e": {"width": 16, "attn_dim": 12, "heads": 3, "gru_layers": 1, "cross_blocks": 1}}


def test_published_numbers_come_from_the_models_doc():
    published = report.published_numbers(project_root() / "docs/models.md").set_index(["model", "dataset"])
    assert published.loc[("sdt", "iemocap"), "value"] == 74.08 and published.loc[("sdt", "meld"), "value"] == 66.60
    assert published.loc[("mister_e", "mosi"), "value"] == 87.9
    assert set(published["protocol"]) == {"test-selected, seeds unknown"}
    assert published.loc[("sdt", "meld"), "paper"] == "arXiv 2310.20494"


def test_leaderboard_display_keeps_extra_columns_and_adds_the_published_one():
    board = pd.DataFrame({"dataset": ["meld", "meld"], "model": ["sdt", "baseline"], "n_seeds": [3, 3],
                          "wf1_mean": [60.0, 55.5], "wf1_std": [1.0, np.nan], "wf1_ci_low": [58.0, 54.0]})
    published = pd.DataFrame([{"model": "sdt", "dataset": "meld", "paper": "p", "metric": "wf1", "value": 66.6,
                               "protocol": report.PUBLISHED_PROTOCOL}])
    shown = report.leaderboard_display(board, published)
    assert shown["wf1"].tolist() == ["60.00 ± 1.00", "55.50"]
    assert shown[f"published wf1 ({report.PUBLISHED_PROTOCOL})"].tolist() == ["66.60", ""]
    assert shown["wf1_ci_low"].tolist() == ["58.00", "54.00"]


@pytest.fixture(scope="module")
def stage(ray_session, tiny_emotion, tmp_path_factory):
    """Two models (baseline, mister_e; two seeds) trained on the tiny dataset laid out as a project's data/, their
    train-stage files and leaderboard, then the report stage run as DVC runs it."""
    root = tmp_path_factory.mktemp("report")
    shutil.copytree(tiny_emotion, root / "data" / "prepared" / "tiny")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    files = []
    for model, config in MODELS.items():
        runs = [TrainConfig(dataset="tiny", prepared=str(root / "data/prepared/tiny"), inputs=dict(INPUTS), model=model,
                            model_config=config, seed=seed, epochs=2, batch_size=4, lr=3e-3,
                            storage_path=str(root / "ray"), tracking_uri=uri, experiment="erc")
                for seed in (0, 1)]
        results = run_all(runs)
        files.append(root / "runs" / "tiny" / f"{model}.json")
        files[-1].parent.mkdir(parents=True, exist_ok=True)
        files[-1].write_text(json.dumps({"dataset": "tiny", "model": model, "runs": results}))
    client = mlflow.MlflowClient(uri)
    board = leaderboard.summarise(leaderboard.fetch_runs(client, leaderboard.run_ids_from(files)))
    (root / "reports").mkdir()
    board.to_csv(root / "reports" / "leaderboard.csv", index=False)
    (root / "params.yaml").write_text(yaml.safe_dump({"data_dir": "data", "train": {"experiment": "erc"}}))
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(project_root())}
    done = subprocess.run([sys.executable, str(project_root() / "pipelines/report.py"), "--leaderboard",
                           "reports/leaderboard.csv", "--models-doc", str(project_root() / "docs/models.md"),
                           "--out", "reports/report", *map(str, files)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"root": root, "out": root / "reports" / "report", "client": client, "stdout": done.stdout,
            "run_ids": leaderboard.run_ids_from(files)}


def test_report_files_and_robustness(stage):
    out = stage["out"]
    assert {"index.html", "robustness.csv", "robustness.md", "gates.csv", "leaderboard.csv", "published.csv"} <= {
        p.name for p in out.iterdir()}
    figures = {p.name for p in (out / "figures").iterdir()}
    assert {"gates_tiny_mister_e.png", "confusion_tiny_baseline.png", "confusion_tiny_mister_e.png",
            "curves_tiny.png"} <= figures
    assert "gates_tiny_baseline.png" not in figures  # the baseline has no gate
    robust = pd.read_csv(out / "robustness.csv")
    assert set(zip(robust["model"], robust["modality"])) == {(m, x) for m in MODELS for x in ("audio", "text")}
    assert (robust["n_seeds"] == 2).all()
    np.testing.assert_allclose(robust["wf1_drop_mean"], robust["wf1_all"] - robust["wf1_without"], atol=1e-3)
    # Evaluated again from the logged models, the full-input figures are the runs' own test weighted F1.
    board = pd.read_csv(out / "leaderboard.csv").set_index("model")["wf1_mean"]
    for model, wf1 in robust.groupby("model")["wf1_all"].first().items():
        assert wf1 == pytest.approx(board[model], abs=1e-3)
    assert "| tiny | mister_e |" in stage["stdout"]  # the robustness table is printed too
    gates = pd.read_csv(out / "gates.csv")
    mister = gates[gates["model"] == "mister_e"]
    assert set(mister["expert"]) == {"speech", "text", "cross"}
    assert mister["mean"].sum() == pytest.approx(1.0, abs=1e-3) and mister["load"].sum() == pytest.approx(1.0, abs=1e-3)


def test_report_is_an_mlflow_parent_run_and_marks_the_best_versions(stage):
    client = stage["client"]
    parents = client.search_runs([client.get_experiment_by_name("erc").experiment_id], "tags.`erc.role` = 'report'")
    (parent,) = parents
    assert parent.info.status == "FINISHED"
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/index.html" in names
    assert any(k.startswith("wf1_drop.tiny.mister_e.without_") for k in parent.data.metrics)
    for run_id in stage["run_ids"]:
        assert client.get_run(run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id
    for model in MODELS:
        best = client.get_model_version_by_alias(f"erc-tiny-{model}", "best")
        scores = {v.version: client.get_run(v.run_id).data.metrics["selected_val_wf1"]
                  for v in client.search_model_versions(f"name='erc-tiny-{model}'")}
        assert scores[best.version] == max(scores.values())


def chromium():
    """A headless Chromium driven through selenium, or a skip naming what is missing."""
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (the test extra)")
    if missing:
        pytest.skip(f"headless Chromium page test needs {', '.join(missing)} (Debian: chromium, chromium-driver)")
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium must not fetch a driver: the system's is given
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def test_page_in_headless_chromium_shows_the_table_and_images(stage, tmp_path):
    from matplotlib.image import imread
    from selenium.webdriver.common.by import By

    driver = chromium()
    try:
        driver.get((stage["out"] / "index.html").as_uri())
        table = driver.find_element(By.ID, "leaderboard")
        rows = table.find_elements(By.CSS_SELECTOR, "tbody tr")
        headers = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
        column = headers.index("model")
        assert [r.find_elements(By.TAG_NAME, "td")[column].text for r in rows] == sorted(MODELS)
        assert "wf1" in headers and any(h.startswith("published wf1") for h in headers)
        assert driver.find_element(By.ID, "robustness").is_displayed()
        loaded = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0])")
        assert len(loaded) >= 4 and all(ok for _, ok in loaded), loaded
        # The screenshot shows the table: its area on the page is not blank (text and borders drawn there).
        shot = imread(io.BytesIO(driver.get_screenshot_as_png()), format="png")
        (tmp_path / "page.png").write_bytes(driver.get_screenshot_as_png())
        box = driver.execute_script("const r = document.getElementById('leaderboard').getBoundingClientRect();"
                                    "return [r.top, r.left, r.bottom, r.right, window.devicePixelRatio]")
        top, left, bottom, right = (int(v * box[4]) for v in box[:4])  # CSS pixels -> screenshot pixels
        assert 0 <= top < bottom <= shot.shape[0] and right > left
        region = shot[top:bottom, left:right, :3]
        assert region.size and (region.min(axis=-1) < 0.5).mean() > 0.02  # dark pixels: text and rules
    finally:
        driver.quit()
