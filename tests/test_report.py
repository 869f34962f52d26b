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
                          "wf1_mean": [60.0, 55.5], "wf1_std": [1.0, np.nan], "wf1_ci_low": [58.0, 54.0],
                          "wf1_ci_high": [62.0, 57.25], "corr_mean": [0.61234, np.nan], "corr_std": [0.01, np.nan],
                          "p_vs_baseline": [0.0004, np.nan], "significant_vs_baseline": [True, False],
                          "params_total": [587139.0, 2081521.0], "peak_rss_mb": [796.2367, 1377.8]})
    published = pd.DataFrame([{"model": "sdt", "dataset": "meld", "paper": "p", "metric": "wf1", "value": 66.6,
                               "protocol": report.PUBLISHED_PROTOCOL}])
    shown = report.leaderboard_display(board, published)
    assert shown["weighted F1"].tolist() == ["60.00 ± 1.00", "55.50"]
    assert shown[report.PUBLISHED_COLUMN].tolist() == ["66.60", ""]
    assert shown["95% interval"].tolist() == ["[58.00, 62.00]", "[54.00, 57.25]"]
    # Rounded as the leaderboard's markdown rounds them; the significance flag folded into p's *.
    assert shown["correlation"].tolist() == ["0.612 ± 0.010", ""]
    assert shown["p vs baseline"].tolist() == ["< 0.001 *", ""]
    assert shown["parameters"].tolist() == ["0.59M", "2.08M"] and shown["peak MB"].tolist() == ["796", "1378"]
    assert not {"wf1_ci_high", "significant_vs_baseline", "params_total"} & set(shown.columns)


def test_numbers_and_column_names_for_people():
    assert [report.human(c) for c in ("wf1", "acc", "macro_f1", "acc7", "corr", "wf1_binary", "params_total")] == [
        "weighted F1", "accuracy", "macro F1", "7-class accuracy", "correlation", "binary weighted F1", "parameters"]
    board = pd.DataFrame({"dataset": ["meld", "meld", "iemocap"], "variant": ["tuned"] * 3,
                          "model": ["baseline", "sdt", "sdt"], "wf1_mean": [55.5, 58.123, 60.0],
                          "wf1_std": [0.5, 1.0, 1.0], "wf1_ci_low": [54.0, 56.0, 58.0],
                          "wf1_ci_high": [57.0, 60.0, 62.0],
                          "p_vs_baseline": [np.nan, 0.0312, np.nan], "significant_vs_baseline": [False, True, False],
                          "params_total": [587139.0, 2281000.0, 1.0], "train_s_per_epoch": [0.7138, 1.18, 1.0]})
    published = report.published_numbers(project_root() / "docs/models.md")
    short = report.short_leaderboard(board, published, "meld")
    assert list(short.columns) == ["model", "weighted F1", "95% interval", "p vs baseline", "parameters", "s/epoch",
                                   "published (test-selected)"]
    assert short.to_dict("records") == [
        {"model": "baseline", "weighted F1": "55.50 ± 0.50", "95% interval": "[54.00, 57.00]", "p vs baseline": "",
         "parameters": "0.59M", "s/epoch": "0.71", "published (test-selected)": ""},
        {"model": "sdt", "weighted F1": "58.12 ± 1.00", "95% interval": "[56.00, 60.00]", "p vs baseline": "0.031 *",
         "parameters": "2.28M", "s/epoch": "1.18", "published (test-selected)": "66.60"}]


def test_gap_markdown_becomes_html_tables():
    text = ("# From the published figure\n\nTest weighted F1; *change* is the seed mean minus the line above,\n"
            "written by `pipelines/gap.py`.\n\n## sdt on iemocap\n\n| step | seeds | test wF1 |\n|---|---|---|\n"
            "| published (a < b) |  | 74.08 |\n| erc's row | 5 | 58.13 |\n\nRemainder: the inputs.\n")
    out = report.markdown_html(text)
    assert out.count("<table") == 1 and "|" not in out and "---" not in out
    assert "<th>step</th><th>seeds</th><th>test wF1</th>" in out
    assert "<tr><td>published (a &lt; b)</td><td></td><td>74.08</td></tr><tr><td>erc&#x27;s row</td><td>5</td>" in out
    assert "<h3>From the published figure</h3>" in out and "<h4>sdt on iemocap</h4>" in out
    assert ("<p>Test weighted F1; <em>change</em> is the seed mean minus the line above, written by "
            "<code>pipelines/gap.py</code>.</p>") in out and "<p>Remainder: the inputs.</p>" in out
    assert out.index("<table") > out.index("<h4>") and "<div class='wide'><table" in out  # scrolls in its own box


def test_leaderboard_figure_marks_intervals_baseline_and_published():
    from matplotlib.image import imread

    board = pd.DataFrame({"dataset": ["meld"] * 3, "variant": ["tuned"] * 3, "model": ["baseline", "sdt", "summer"],
                          "wf1_mean": [55.5, 58.0, 50.0], "wf1_ci_low": [54.0, 56.0, 48.0],
                          "wf1_ci_high": [57.0, 60.0, 52.0], "p_vs_baseline": [np.nan, 0.03, 0.2],
                          "significant_vs_baseline": [False, True, False]})
    png = report.leaderboard_png(board, report.published_numbers(project_root() / "docs/models.md"), "meld")
    image = imread(io.BytesIO(png), format="png")
    assert image.shape[1] >= 600 and image.shape[0] >= 250
    # The baseline's row is shaded (#fff3c4) and the published figure drawn in grey (0.45).
    rgb = (image[..., :3] * 255).round().astype(int)
    assert ((rgb == [255, 243, 196]).all(axis=-1)).sum() > 1000
    assert ((np.abs(rgb - 115) <= 1).all(axis=-1)).sum() > 20


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
    # The columns the leaderboard stage's significance step adds (its own tests check the figures; made up here).
    board = board.assign(wf1_ci_low=board["wf1_mean"] - 3, wf1_ci_high=board["wf1_mean"] + 3,
                         p_vs_baseline=[np.nan if m == "baseline" else 0.03 for m in board["model"]],
                         significant_vs_baseline=board["model"] != "baseline")
    (root / "reports").mkdir()
    board.to_csv(root / "reports" / "leaderboard.csv", index=False)
    # The gap table as pipelines/gap.py writes it, with a table wider than the window if laid out unwrapped.
    wide = [f"column {i} " + "words " * 8 for i in range(14)]
    (root / "reports" / "gap.md").write_text(
        "# From the published figure to erc's leaderboard row\n\n## baseline on tiny\n\n| step | test wF1 | "
        + " | ".join(wide) + " |\n|---|---|" + "---|" * len(wide) + "\n| published |  74.08 | "
        + " | ".join("x" * 30 for _ in wide) + " |\n")
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
            "curves_tiny.png", "per_class_tiny.png", "robustness_tiny.png"} <= figures
    # The leaderboard figure in a folder of its own: the DVC image plot dvc.yaml declares.
    assert [p.name for p in (out / "figures" / "leaderboard").iterdir()] == ["tiny.png"]
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
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report/figures/leaderboard")} == {
        "report/figures/leaderboard/tiny.png"}
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


def test_page_in_headless_chromium_shows_the_figures_and_fits_the_window(stage, tmp_path):
    from matplotlib.image import imread
    from selenium.webdriver.common.by import By

    driver = chromium()
    try:
        driver.get((stage["out"] / "index.html").as_uri())
        assert driver.execute_script("return window.innerWidth") == 1280
        figure = driver.find_element(By.ID, "leaderboard-figure-tiny")
        assert figure.tag_name == "img" and figure.get_attribute("alt").startswith("tiny leaderboard")
        assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", figure)
        table = driver.find_element(By.ID, "leaderboard-tiny")
        rows = table.find_elements(By.CSS_SELECTOR, "tbody tr")
        headers = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
        assert headers == ["model", "weighted F1", "95% interval", "p vs baseline", "parameters", "s/epoch",
                           "published (test-selected)"]
        assert [r.find_elements(By.TAG_NAME, "td")[0].text for r in rows] == sorted(MODELS)
        assert all(r.find_elements(By.TAG_NAME, "td")[4].text.endswith("M") for r in rows)
        for dataset_figure in ("per-class-figure-tiny", "robustness-figure-tiny"):
            assert driver.find_element(By.ID, dataset_figure).is_displayed()
        assert len(driver.find_elements(By.CSS_SELECTOR, ".gap table")) == 1
        full = driver.find_element(By.ID, "leaderboard")
        assert not full.is_displayed()  # one click away, in a <details>
        assert driver.find_element(By.CSS_SELECTOR, "a[href='leaderboard.csv']").is_displayed()
        loaded = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0])")
        assert len(loaded) >= 7 and all(ok for _, ok in loaded), loaded
        # No sideways scrolling at 1280 px, with every <details> open too: wide tables scroll in their own box.
        width = "return [document.documentElement.scrollWidth, window.innerWidth]"
        assert driver.execute_script(width)[0] <= 1280, driver.execute_script(width)
        driver.execute_script("document.querySelectorAll('details').forEach(d => d.open = true)")
        assert full.is_displayed()
        assert driver.execute_script(width)[0] <= 1280, driver.execute_script(width)
        driver.execute_script("arguments[0].scrollIntoView()", table)
        # The screenshot shows the short table: its area on the page is not blank (text and borders drawn there).
        png = driver.get_screenshot_as_png()
        shot = imread(io.BytesIO(png), format="png")
        (tmp_path / "page.png").write_bytes(png)
        box = driver.execute_script("const r = arguments[0].getBoundingClientRect();"
                                    "return [r.top, r.left, r.bottom, r.right, window.devicePixelRatio]", table)
        top, left, bottom, right = (int(v * box[4]) for v in box[:4])  # CSS pixels -> screenshot pixels
        assert 0 <= top < bottom <= shot.shape[0] and right > left
        region = shot[top:bottom, left:right, :3]
        assert region.size and (region.min(axis=-1) < 0.5).mean() > 0.02  # dark pixels: text and rules
    finally:
        driver.quit()
