"""The report people open: one self-contained HTML page over the leaderboard's runs, and the same in MLflow.

For every run of the leaderboard, its logged model (`erc.serving.predict.load_model`) is evaluated again on the test
split: with every modality (confusion matrices), with each modality removed (`erc.evaluation.robustness`), and with its
gates and routers read out (`erc.evaluation.gates`). The page holds the leaderboard table (with the published numbers of
docs/models.md beside erc's, marked with their protocol), per-class F1, the robustness table, the gate and
router plots, confusion matrices and learning curves; every picture is embedded, so the page is one file.
The same files go to an MLflow run, the parent of the leaderboard's runs, so that `mlflow ui` shows them together.
"""

from __future__ import annotations

import base64
import html
import io
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from erc import tracking
from erc.errors import ErcDataError
from erc.evaluation import gates as gate_stats
from erc.evaluation import robustness
from erc.metrics import confusion
from erc.evaluation.inference import infer

PUBLISHED_PROTOCOL = "test-selected, seeds unknown"
DATASET_NAMES = {"iemocap-6": "iemocap", "iemocap": "iemocap", "meld": "meld", "mosi": "mosi", "cmu-mosi": "mosi"}
REPORTED = re.compile(r"Reported weighted F1[^:]*:\s*((?:[A-Za-z0-9-]+ \d+(?:\.\d+)?(?:,\s*|\.|\s|$))+)")


def published_numbers(models_md) -> pd.DataFrame:
    """The published figures quoted in docs/models.md: model, dataset, paper, metric, value, protocol.

    Read from each model section's "Reported weighted F1 (...): IEMOCAP-6 74.08, MELD 66.60." sentence."""
    path = Path(models_md)
    try:
        text = path.read_text()
    except OSError as e:
        raise ErcDataError(path, f"unreadable ({e.strerror})") from None
    rows = []
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        name = re.match(r"`([^`]+)`", section)
        flat = " ".join(section.split())
        found = REPORTED.search(flat)
        if not name or not found:
            continue
        paper = re.search(r"arXiv (\d{4}\.\d{4,5})", flat)
        for dataset, value in re.findall(r"([A-Za-z][A-Za-z0-9-]*) (\d+(?:\.\d+)?)", found.group(1)):
            if dataset.lower() in DATASET_NAMES:
                rows.append({"model": name.group(1), "dataset": DATASET_NAMES[dataset.lower()],
                             "paper": f"arXiv {paper.group(1)}" if paper else "", "metric": "wf1",
                             "value": float(value), "protocol": PUBLISHED_PROTOCOL})
    return pd.DataFrame(rows, columns=["model", "dataset", "paper", "metric", "value", "protocol"])


# ---------------------------------------------------------------- evaluating the runs again


@dataclass
class Evaluated:
    """What the report computed from the leaderboard's runs."""

    robustness: pd.DataFrame  # one row per run and removed modality
    gates: pd.DataFrame  # one row per run, gate and expert
    confusions: dict = field(default_factory=dict)  # (dataset, model) -> (labels, pooled confusion matrix)
    labels: dict = field(default_factory=dict)  # dataset -> label names


def held_out(info: dict, data_dir, cache: dict):
    """The test split of the model's dataset with the model's feature sets, from `data_dir` (loaded once)."""
    from erc.training.config import TrainConfig
    from erc.training.task import load_task

    speakers = "name" if info.get("speaker_names") else "appearance"  # as the model was trained
    key = (info["dataset"], tuple(sorted(info["inputs"].items())), speakers)
    if key not in cache:
        data = Path(data_dir)
        cfg = TrainConfig(dataset=info["dataset"], prepared=str(data / "prepared" / info["dataset"]),
                          feature_dirs=[str(data / "features" / info["dataset"])], inputs=dict(info["inputs"]),
                          speakers=speakers)
        cache[key] = load_task(cfg, splits=("test",)).splits["test"]
    return cache[key]


def evaluate(runs: pd.DataFrame, data_dir, tracking_uri: str, progress=print) -> Evaluated:
    """Every run's logged model on the test split: robustness rows, gate statistics, pooled confusion matrices."""
    from erc.models.checkpoint import load_model

    robust, gate_rows, confusions, labels, cache = [], [], {}, {}, {}
    for row in runs.itertuples():
        loaded = load_model(row.run_id, tracking_uri)
        data = held_out(loaded.info, data_dir, cache)
        names = loaded.info["labels"]
        labels[row.dataset] = names
        full = infer(loaded.model, data)
        keys = {"dataset": row.dataset, "model": row.model, "features": row.features, "seed": row.seed,
                "run_id": row.run_id}
        for r in robustness.modality_drops(loaded.model, data, names, full=full):
            robust.append({**keys, **r})
        stats = gate_stats.statistics(full, names)
        if len(stats):
            gate_rows.append(stats.assign(**keys))
        labelled = full.labels >= 0
        cm = confusion(full.labels[labelled], full.pred[labelled], len(names))
        key = (row.dataset, row.model)
        confusions[key] = (names, confusions[key][1] + cm if key in confusions else cm)
        progress(f"report: {row.dataset}/{row.model}/seed{row.seed} evaluated")
    return Evaluated(pd.DataFrame(robust), pd.concat(gate_rows, ignore_index=True) if gate_rows else pd.DataFrame(),
                     confusions, labels)


def learning_curves(client, runs: pd.DataFrame) -> pd.DataFrame:
    """Per-epoch validation weighted F1 of every run (dataset, model, seed, epoch, metric, value)."""
    rows = []
    for row in runs.itertuples():
        for m in client.get_metric_history(row.run_id, "val_wf1"):
            rows.append({"dataset": row.dataset, "model": row.model, "seed": row.seed, "epoch": m.step,
                         "metric": "val_wf1", "value": m.value})
    return pd.DataFrame(rows, columns=["dataset", "model", "seed", "epoch", "metric", "value"])


# ---------------------------------------------------------------- tables and pictures


def leaderboard_display(board: pd.DataFrame, published: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard as shown: `<m>_mean` ± `<m>_std` in one cell, any other column as it is (confidence
    intervals and tests where the leaderboard has them), and the published weighted F1 beside erc's."""
    out = pd.DataFrame(index=board.index)
    done = set()
    for col in board.columns:
        if col in done:
            continue
        if col.endswith("_mean"):
            base = col[: -len("_mean")]
            std = board.get(f"{base}_std")
            out[base] = [("" if pd.isna(m) else f"{m:.2f}" + ("" if std is None or pd.isna(s) else f" ± {s:.2f}"))
                         for m, s in zip(board[col], std if std is not None else [np.nan] * len(board))]
            done |= {col, f"{base}_std"}
            if base == "wf1":
                ref = {(r.model, r.dataset): r.value for r in published.itertuples()}
                out[f"published wf1 ({PUBLISHED_PROTOCOL})"] = [
                    f"{ref[(m.split('-')[0], d)]:.2f}" if (m.split("-")[0], d) in ref else ""
                    for m, d in zip(board["model"], board["dataset"])]
        else:
            out[col] = [f"{v:.2f}" if isinstance(v, float) and not pd.isna(v) else ("" if pd.isna(v) else v)
                        for v in board[col]]
    return out


def per_class_f1(runs: pd.DataFrame, labels: dict) -> dict[str, pd.DataFrame]:
    """Per dataset: test F1 per class (rows: model), mean over seeds."""
    tables = {}
    for dataset, part in runs.groupby("dataset"):
        cols = [f"f1_{label}" for label in labels.get(dataset, []) if f"f1_{label}" in part]
        if cols:
            table = part.groupby("model")[cols].mean()
            tables[dataset] = table.rename(columns=lambda c: c[len("f1_"):])
    return tables


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def curves_png(curves: pd.DataFrame, dataset: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    part = curves[(curves["dataset"] == dataset) & (curves["metric"] == "val_wf1")]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for i, (model, by_model) in enumerate(part.groupby("model")):
        for j, (_, run) in enumerate(by_model.groupby("seed")):
            ax.plot(run["epoch"], run["value"], color=f"C{i}", alpha=0.8, linewidth=1, label=model if j == 0 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation weighted F1")
    ax.set_title(f"{dataset}: validation weighted F1 per epoch (one line per seed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


# ---------------------------------------------------------------- the page


STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px}
th{background:#f0f0f0}td{text-align:right}td:first-child,td:nth-child(2){text-align:left}
img{max-width:100%;border:1px solid #eee;margin:4px}.confusion img{max-width:360px}.note{color:#555;font-size:13px}figure{display:inline-block}"""


def _table(frame: pd.DataFrame, table_id: str, index: bool = False) -> str:
    return frame.to_html(table_id=table_id, index=index, na_rep="", escape=True, border=0,
                         float_format=lambda v: f"{v:.2f}")


def _image(png: bytes, alt: str, section: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure class="{section}"><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def page(*, board: pd.DataFrame, published: pd.DataFrame, classes: dict, robust_table: pd.DataFrame,
         images: dict[str, list[tuple[str, bytes]]], generated: str) -> str:
    """The report as one HTML string; `images`: section -> [(caption, PNG bytes)]."""
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>erc report</title>"
             f"<style>{STYLE}</style></head><body>", "<h1>erc report</h1>",
             f"<p class='note'>{html.escape(generated)}</p>",
             "<h2 id='leaderboard-section'>Leaderboard</h2>",
             "<p class='note'>Test-split figures (percent) of the checkpoint selected on validation weighted F1, "
             "mean ± sample std over seeds. The published column quotes the papers (docs/models.md), whose epochs were "
             f"selected on the test split with unknown seeds ({PUBLISHED_PROTOCOL}): not comparable one to one.</p>",
             _table(leaderboard_display(board, published), "leaderboard")]
    parts.append("<h2>Per-class F1</h2>")
    for dataset, table in classes.items():
        parts += [f"<h3>{html.escape(dataset)}</h3>", _table(table.reset_index(), f"per-class-{dataset}")]
    parts += ["<h2>Missing-modality robustness</h2>",
              "<p class='note'>Drop in test weighted F1 (points; mean ± std over seeds) when a modality is removed "
              "through the model's modality mask, its own missing-modality path (not zeros posing as data). "
              "Single-modality runs have nothing to remove.</p>",
              _table(robust_table, "robustness") if len(robust_table) else "<p>No multimodal runs.</p>"]
    titles = {"gates": "How the experts are used (mean gate weight per true class, and load)",
              "confusion": "Confusion matrices (test, pooled over seeds)", "curves": "Learning curves"}
    for section, title in titles.items():
        parts.append(f"<h2>{title}</h2>")
        parts += [_image(png, caption, section) for caption, png in images.get(section, [])] or ["<p>None.</p>"]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_page(out, *, board: pd.DataFrame, published: pd.DataFrame, evaluated: Evaluated, robust: pd.DataFrame,
               curves: pd.DataFrame, runs: pd.DataFrame, leaderboard_csv, generated: str) -> None:
    """The report folder: index.html (one self-contained page), its figures, and the tables behind them as CSV."""
    out = Path(out)
    (out / "figures").mkdir(parents=True)
    images = {"gates": [], "confusion": [], "curves": []}
    if len(evaluated.gates):
        keys = ["dataset", "model", "gate", "expert"]
        means = evaluated.gates.groupby(keys, sort=False).mean(numeric_only=True).reset_index()
        means.drop(columns=["seed"]).to_csv(out / "gates.csv", index=False, float_format="%.4f")
        for (dataset, model), part in means.groupby(["dataset", "model"], sort=True):
            path = out / "figures" / f"gates_{dataset}_{model}.png"
            gate_stats.plot(part, evaluated.labels[dataset], f"{dataset} {model}", path)
            images["gates"].append((f"{dataset} {model} gates", path.read_bytes()))
    for (dataset, model), (labels, cm) in sorted(evaluated.confusions.items()):
        path = out / "figures" / f"confusion_{dataset}_{model}.png"
        tracking.confusion_png(cm, labels, f"{dataset} {model}: test, all seeds", path)
        images["confusion"].append((f"{dataset} {model} confusion", path.read_bytes()))
    for dataset in sorted(curves["dataset"].unique()):
        png = curves_png(curves, dataset)
        (out / "figures" / f"curves_{dataset}.png").write_bytes(png)
        images["curves"].append((f"{dataset} learning curves", png))
    if len(robust):
        robust.to_csv(out / "robustness.csv", index=False, float_format="%.4f")
        (out / "robustness.md").write_text(robustness.to_markdown(robust))
    published.to_csv(out / "published.csv", index=False)
    shutil.copy2(leaderboard_csv, out / "leaderboard.csv")
    (out / "index.html").write_text(page(
        board=board, published=published, classes=per_class_f1(runs, evaluated.labels),
        robust_table=robustness_display(robust), images=images, generated=generated))


def robustness_display(table: pd.DataFrame) -> pd.DataFrame:
    if table.empty:
        return table
    shown = table.copy()
    shown["wF1 drop"] = [f"{m:+.2f}" + ("" if pd.isna(s) else f" ± {s:.2f}")
                         for m, s in zip(shown["wf1_drop_mean"], shown["wf1_drop_std"])]
    shown = shown.rename(columns={"modality": "removed", "wf1_all": "wF1 (all)", "wf1_without": "wF1 (without)",
                                  "changed": "predictions changed (%)", "n_seeds": "seeds"})
    return shown[["dataset", "model", "removed", "seeds", "wF1 (all)", "wF1 (without)", "wF1 drop",
                  "predictions changed (%)"]]




# ---------------------------------------------------------------- MLflow


def log_parent_run(client, experiment_id: str, out_dir, runs: pd.DataFrame, robust: pd.DataFrame) -> str:
    """An MLflow run holding the report's files and the robustness drops as metrics, made the parent of every
    leaderboard run (so the runs page nests them under it). Returns its id."""
    from mlflow.entities import Metric, RunTag

    parent = client.create_run(experiment_id, tags={"mlflow.runName": "leaderboard report", "erc.role": "report"})
    run_id = parent.info.run_id
    try:
        client.log_artifacts(run_id, str(out_dir), "report")
        metrics = [Metric(f"wf1_drop.{r.dataset}.{r.model}.without_{r.modality}", float(r.wf1_drop_mean), 0, 0)
                   for r in robust.itertuples()] if len(robust) else []
        for start in range(0, len(metrics), 500):
            client.log_batch(run_id, metrics=metrics[start:start + 500])
        for child in runs["run_id"]:
            client.log_batch(child, tags=[RunTag("mlflow.parentRunId", run_id)])
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    return run_id


def mark_best_versions(client, runs: pd.DataFrame, alias: str = "best") -> dict[str, str]:
    """Alias `alias` on each registered model's version whose run has the best validation weighted F1 among the
    leaderboard's runs (selection on validation, never on test). Returns {registered name: version}."""
    best: dict[str, tuple[float, str]] = {}
    for run_id in runs["run_id"]:
        score = client.get_run(run_id).data.metrics.get("selected_val_wf1", float("-inf"))
        for version in client.search_model_versions(f"run_id='{run_id}'"):
            if version.name not in best or score > best[version.name][0]:
                best[version.name] = (score, version.version)
    for name, (_, version) in best.items():
        client.set_registered_model_alias(name, alias, version)
    return {name: version for name, (_, version) in best.items()}
